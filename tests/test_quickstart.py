"""The quickstart task: deterministic, leak-free data and first-match answer scoring."""

import pytest

from milora_cli.errors import DataError
from milora_cli.data.quickstart import FAMILIES, accuracy, extract_answer, family_of, generate, is_correct

REVERSE = {"instruction": "Reverse the order of the words: lamp tiger apple", "input": "",
           "output": "apple tiger lamp", "answer": "apple tiger lamp"}
LARGER = {"instruction": "Which is larger, 384 or 371?", "input": "", "output": "384", "answer": "384"}
SORT = {"instruction": "Sort from smallest to largest: 42, 7, 19", "input": "",
        "output": "7, 19, 42", "answer": "7, 19, 42"}


def test_same_seed_same_data_other_seed_other_data():
    assert generate(0, 60, 30) == generate(0, 60, 30)
    assert generate(0, 60, 30) != generate(1, 60, 30)


def test_records_have_the_llm_adapters_layout_and_balanced_families():
    train, heldout = generate(3, 90, 30)
    assert len(train) == 90 and len(heldout) == 30
    for record in train + heldout:
        assert set(record) == {"instruction", "input", "output", "answer"}
        assert record["input"] == ""
    assert sorted(family_of(r) for r in heldout) == sorted(list(FAMILIES) * 10)


def test_heldout_questions_are_distinct_and_never_in_train():
    train, heldout = generate(7, 3000, 300)
    held = [r["instruction"] for r in heldout]
    assert len(set(held)) == len(held)
    assert not set(held) & {r["instruction"] for r in train}


def test_asking_for_more_distinct_questions_than_exist_is_a_data_error():
    with pytest.raises(DataError, match="n_heldout=12000"):  # 'reverse' has only 16*15*14 = 3360
        generate(0, 10, 12000)


def test_every_generated_output_scores_correct():
    train, heldout = generate(11, 300, 150)
    for record in train + heldout:
        assert is_correct(record["output"], record), record


@pytest.mark.parametrize(
    "example, generation, expected",
    [
        # correct answer inside a sentence
        (REVERSE, "The reversed order is: apple tiger lamp.", "apple tiger lamp"),
        (LARGER, "The larger number is 384.", "384"),
        (SORT, "Sorted: 7, 19 and 42", "7, 19, 42"),
        # upper case
        (REVERSE, "APPLE TIGER LAMP", "apple tiger lamp"),
        # several candidates: the first one wins, even when a later one is right
        (REVERSE, "lamp tiger apple becomes apple tiger lamp", "lamp tiger apple"),
        (LARGER, "371 is smaller than 384", "371"),
        (SORT, "The numbers 42, 7, 19 sorted are 7, 19, 42", "42, 7, 19"),
        # no answer at all
        (REVERSE, "The words are reversed.", None),
        (LARGER, "To determine which number is larger, we", None),
        (SORT, "Only 7 and 19", None),
    ],
)
def test_extract_answer_takes_the_first_match(example, generation, expected):
    assert extract_answer(generation, example) == expected
    assert is_correct(generation, example) == (expected == example["answer"])


def test_wrong_answers_score_wrong():
    assert not is_correct("371", LARGER)
    assert not is_correct("7, 42, 19", SORT)
    assert not is_correct("tiger apple lamp", REVERSE)
    assert not is_correct("", REVERSE)


def test_accuracy_per_family_and_overall():
    scores = accuracy(["384", "nothing", "7, 19, 42", "apple tiger lamp"], [LARGER, SORT, SORT, REVERSE])
    assert scores == {"reverse": 1.0, "larger": 1.0, "sort": 0.5, "all": 0.75}


def test_foreign_record_is_a_data_error():
    with pytest.raises(DataError, match="not a quickstart question"):
        is_correct("yes", {"instruction": "Is the sky blue?", "input": "", "output": "yes", "answer": "yes"})
