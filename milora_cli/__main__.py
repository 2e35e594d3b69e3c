from milora_cli.cli import main

main()
