"""Voting on hand-made matrices: plurality, the tie rule, all members disagreeing, one member,
weights, soft vote, oracle accuracy and pairwise disagreement. No Ray."""
import numpy as np
import pytest

from ray_train.strategies.ensemble.voting import (
    accuracy,
    disagreement,
    majority_vote,
    oracle_accuracy,
    soft_vote,
    vote_counts,
)


def one_hot_probs(preds, classes, confidence):
    """Probabilities [M, n, C] whose argmax is ``preds`` with the given top probability per vote."""
    preds, confidence = np.asarray(preds), np.asarray(confidence, dtype=np.float64)
    m, n = preds.shape
    rest = (1.0 - confidence) / (classes - 1)
    p = np.broadcast_to(rest[..., None], (m, n, classes)).copy()
    np.put_along_axis(p, preds[..., None], confidence[..., None], axis=2)
    return p


def test_plurality_wins():
    votes = np.array([[3, 1, 7, 2],
                      [3, 1, 7, 5],
                      [4, 1, 0, 5],
                      [3, 2, 7, 5],
                      [4, 9, 1, 6]])
    assert majority_vote(votes).tolist() == [3, 1, 7, 5]
    counts = vote_counts(votes, num_classes=10)
    assert counts.shape == (4, 10) and counts[0, 3] == 3 and counts[0, 4] == 2 and counts.sum() == 20


def test_tie_without_probabilities_goes_to_the_lowest_label():
    votes = np.array([[8, 2], [3, 2], [8, 6], [3, 6]])  # 2-2 ties in both columns
    assert majority_vote(votes).tolist() == [3, 2]


def test_tie_goes_to_the_highest_summed_probability():
    # Column 0: classes 3 and 8 tie 2-2, the 8-voters are surer (0.9 + 0.9 > 0.6 + 0.6) -> 8.
    # Column 1: 2-2 between 2 and 6; the 2-voters are surer -> 2 (lowest label would also say 2).
    preds = np.array([[8, 2], [3, 2], [8, 6], [3, 6]])
    conf = np.array([[0.9, 0.95], [0.6, 0.95], [0.9, 0.5], [0.6, 0.5]])
    assert majority_vote(one_hot_probs(preds, 10, conf)).tolist() == [8, 2]


def test_probability_beats_label_only_among_tied_classes():
    # A 3-2 plurality for 1 stands even though the two 7-voters are far more confident:
    # the probability sum only breaks ties, it never overrides the count.
    preds = np.array([[1], [1], [1], [7], [7]])
    conf = np.array([[0.35], [0.35], [0.35], [0.99], [0.99]])
    probs = one_hot_probs(preds, 10, conf)
    assert majority_vote(probs).tolist() == [1]
    assert soft_vote(probs)[0].tolist() == [7]  # ... while the soft vote follows the confidence


def test_equal_probability_sums_fall_back_to_the_lowest_label():
    preds = np.array([[5], [4]])
    probs = one_hot_probs(preds, 10, np.array([[0.7], [0.7]]))
    # Both tied classes get 0.7 + 0.3/9 in the summed probabilities: the lowest label, 4, wins.
    assert majority_vote(probs).tolist() == [4]


def test_all_members_disagree():
    preds = np.array([[0], [4], [9], [2], [6]])
    assert majority_vote(preds).tolist() == [0]  # five one-vote ties: lowest label
    conf = np.array([[0.4], [0.5], [0.97], [0.6], [0.3]])
    assert majority_vote(one_hot_probs(preds, 10, conf)).tolist() == [9]  # surest member's class


def test_one_member_is_its_own_vote():
    preds = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert majority_vote(preds).tolist() == preds[0].tolist()
    probs = one_hot_probs(preds, 10, np.full(preds.shape, 0.8))
    assert majority_vote(probs).tolist() == preds[0].tolist()
    assert soft_vote(probs)[0].tolist() == preds[0].tolist()
    assert oracle_accuracy(preds, preds[0]) == 1.0
    assert disagreement(preds).tolist() == [[0.0]]


def test_weights_change_the_winner():
    preds = np.array([[2, 0], [5, 0], [5, 1]])
    assert majority_vote(preds).tolist() == [5, 0]
    assert majority_vote(preds, weights=[3, 1, 1]).tolist() == [2, 0]  # 3 votes against 2
    assert majority_vote(preds, weights=[1, 0, 5]).tolist() == [5, 1]  # a silenced member
    # Weighted counts tie (2 vs 1+1) -> lowest label without probabilities.
    assert majority_vote(preds, weights=[2, 1, 1]).tolist() == [2, 0]
    # Float weights that tie only up to rounding (0.1 + 0.2 vs 0.3) still count as a tie.
    assert majority_vote(np.array([[7], [7], [3]]), weights=[0.1, 0.2, 0.3]).tolist() == [3]


def test_weighted_tie_uses_weighted_probability_sums():
    preds = np.array([[2], [5], [5]])
    conf = np.array([[0.9], [0.6], [0.6]])
    probs = one_hot_probs(preds, 10, conf)
    # Counts 2 vs 1+1 tie; weighted sums: class 2: 2*0.9 + 2*(0.4/9) ~ 1.89, class 5: 0.6+0.6+0.2/9 ~ 1.24.
    assert majority_vote(probs, weights=[2, 1, 1]).tolist() == [2]


def test_soft_vote_is_the_weighted_mean():
    probs = np.array([[[0.6, 0.4]], [[0.2, 0.8]], [[0.3, 0.7]]])
    labels, mean = soft_vote(probs)
    np.testing.assert_allclose(mean, [[1.1 / 3, 1.9 / 3]])
    assert labels.tolist() == [1]
    labels, mean = soft_vote(probs, weights=[4, 1, 0])
    np.testing.assert_allclose(mean, [[(2.4 + 0.2) / 5, (1.6 + 0.8) / 5]])
    assert labels.tolist() == [0]


def test_oracle_accuracy_and_disagreement():
    y = np.array([0, 1, 2, 3])
    preds = np.array([[0, 1, 9, 9],
                      [0, 9, 2, 9],
                      [9, 9, 9, 9]])
    assert oracle_accuracy(preds, y) == 0.75  # nobody gets example 3
    d = disagreement(preds)
    np.testing.assert_allclose(d, [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    # The same from probabilities (argmax first).
    assert oracle_accuracy(one_hot_probs(preds, 10, np.full(preds.shape, 0.9)), y) == 0.75
    # The vote is [0, 9, 9, 9]: two right answers are outvoted, so the oracle is far above the vote.
    assert accuracy(majority_vote(preds), y) == (0.25, 3)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 4, 5)), "expected predictions"),
    (np.array([[0.5, 1.5]]), "integer labels"),
    (np.array([[-1, 2]]), ">= 0"),
])
def test_bad_shapes_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        majority_vote(bad)


def test_bad_weights_are_refused():
    preds = np.array([[1], [2]])
    with pytest.raises(ValueError, match="expected 2 weights"):
        majority_vote(preds, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="at least one"):
        majority_vote(preds, weights=[0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        soft_vote(np.ones((2, 1, 3)) / 3, weights=[1, -1])
