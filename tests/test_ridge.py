"""The ridge baseline (``icmlora.generators.ridge``): the closed form, the choice of its
regularization by leaving one training task out, and that a held-out task never reaches it."""

import pytest
import torch

from icmlora.generators.ridge import LAMBDA_GRID, _scale, fit_ridge, fit_ridge_loto, fit_training_tasks, loto_scores, task_targets


def _tasks(n=7, d=5, D=40, noise=0.0, seed=0):
    """n task vectors [n, d] and rows that are a linear function of them (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=g) * 3 + 1
    weight, bias = torch.randn(D, d, generator=g), torch.randn(D, generator=g)
    rows = bias + vectors @ weight.T + noise * torch.randn(n, D, generator=g)
    return vectors, rows


def test_the_closed_form_is_sklearns_ridge_on_the_standardized_vectors():
    from sklearn.linear_model import Ridge

    vectors, rows = _tasks(noise=0.3)
    fitted = fit_ridge(vectors, rows, lam=2.5)
    x = ((vectors - fitted.cond_mean) / fitted.cond_scale).double().numpy()
    reference = Ridge(alpha=2.5).fit(x, rows.double().numpy())
    new = torch.randn(3, vectors.shape[1], generator=torch.Generator().manual_seed(9))
    ours = torch.stack([fitted.predict(v) for v in new]).double()
    theirs = torch.from_numpy(reference.predict(((new - fitted.cond_mean) / fitted.cond_scale).double().numpy()))
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)  # float32 out, from float64 arithmetic
    assert fitted.dual.shape == rows.shape and fitted.conditions.shape == vectors.shape  # n x D, never D x d


def test_a_linear_task_family_is_recovered_for_a_task_left_out():
    """Rows that are an exact linear function of the vectors: a map fitted without one task with a
    small lam predicts that task's row (the composition a held-out task needs)."""
    vectors, rows = _tasks(n=8, d=3)
    fitted = fit_ridge(vectors[:-1], rows[:-1], lam=1e-9)
    assert torch.allclose(fitted.predict(vectors[-1]), rows[-1], atol=1e-3, rtol=1e-4)
    assert not torch.allclose(fit_ridge(vectors[:-1], rows[:-1], lam=1e3).predict(vectors[-1]), rows[-1], atol=1e-1)


def test_leave_one_task_out_picks_the_lam_whose_predictions_point_where_the_left_out_rows_do():
    exact, noisy = _tasks(n=8, d=3), _tasks(n=8, d=6, noise=20.0, seed=1)
    fitted, scores = fit_ridge_loto(*exact)
    assert set(scores) == set(LAMBDA_GRID)
    best = max(scores, key=scores.get)
    assert fitted.lam == pytest.approx(best * _scale(exact[0]))
    assert scores[best] > 0.999 and best <= 1e-2  # noiseless and linear: little shrinkage predicts best
    _, noisy_scores = fit_ridge_loto(*noisy)
    assert max(noisy_scores.values()) < 0.9 and max(noisy_scores, key=noisy_scores.get) > min(LAMBDA_GRID)  # noise: shrink
    # Ties go to the larger lam: a grid of two values that score alike picks the second.
    same = (exact[0], exact[1] * 0)  # every target row 0: every lam predicts 0, cosine 0
    _, tied = fit_ridge_loto(*same, grid=(1e-3, 1.0))
    assert tied == {1e-3: 0.0, 1.0: 0.0} and fit_ridge_loto(*same, grid=(1e-3, 1.0))[0].lam == pytest.approx(_scale(exact[0]))
    with pytest.raises(ValueError, match="at least 2 training tasks"):
        loto_scores(exact[0][:1], exact[1][:1])
    single, none = fit_ridge_loto(exact[0][:1], exact[1][:1])  # one training task: its row, whatever the vector
    assert torch.allclose(single.predict(exact[0][5]), exact[1][0]) and none == {}


def test_a_held_out_task_never_reaches_the_map():
    """Change every row and the vector of the held-out tasks: the fitted map and the chosen lam are
    bit-identical; change one training task's row and the map changes (the test can fail)."""
    tasks = ["a", "b", "c", "d", "e", "f"]
    heldout = {"b", "e"}
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(len(tasks) * 4, 30, generator=g)
    task_index = torch.arange(len(tasks)).repeat_interleave(4)
    vectors = {t: torch.randn(8, generator=g) for t in tasks}
    fitted, scores = fit_training_tasks(rows, task_index, tasks, vectors, heldout)

    changed_rows, changed_vectors = rows.clone(), dict(vectors)
    for t in heldout:
        changed_rows[task_index == tasks.index(t)] = 100 * torch.randn(4, 30, generator=g)
        changed_vectors[t] = vectors[t] * -7 + 3
    again, scores_again = fit_training_tasks(changed_rows, task_index, tasks, changed_vectors, heldout)
    assert scores_again == scores and again.lam == fitted.lam
    for name in ("cond_mean", "cond_scale", "row_mean", "conditions", "dual"):
        assert torch.equal(getattr(again, name), getattr(fitted, name)), name

    touched = rows.clone()
    touched[task_index == tasks.index("a")] += 1.0
    other, _ = fit_training_tasks(touched, task_index, tasks, vectors, heldout)
    assert not torch.equal(other.row_mean, fitted.row_mean)


def test_a_task_target_is_the_mean_of_its_rows():
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])
    assert torch.equal(task_targets(rows, torch.tensor([0, 0, 1]), [1, 0]), torch.tensor([[10.0, 10.0], [2.0, 3.0]]))


def test_lams_unit_is_the_mean_squared_norm_of_the_standardized_vectors_and_each_fold_takes_its_own():
    vectors, rows = _tasks(n=5, d=4, noise=1.0)
    mean = vectors.mean(0)
    scale = (vectors - mean).std()  # one scale for every dimension, as the CVAE's condition
    unit = float(((vectors - mean) / scale).double().pow(2).sum(1).mean())
    assert _scale(vectors) == pytest.approx(unit, rel=1e-6) and unit > 1
    assert _scale(vectors[:1]) == 1e-12  # one vector standardizes to 0: the floor, never a division by 0
    # Each left-out fold's lam is c times the unit of the tasks it was fitted on, not of all of them.
    c = 0.3
    expected = 0.0
    for out in range(5):
        keep = [i for i in range(5) if i != out]
        predicted = fit_ridge(vectors[keep], rows[keep], c * _scale(vectors[keep])).predict(vectors[out])
        expected += float(torch.nn.functional.cosine_similarity(predicted.double(), rows[out].double(), dim=0)) / 5
    assert loto_scores(vectors, rows, grid=(c,)) == {c: pytest.approx(expected, abs=1e-12)}
    assert set(loto_scores(vectors[:2], rows[:2], grid=(c,))) == {c}  # two tasks are enough to leave one out
    single, _ = fit_ridge_loto(vectors[:1], rows[:1])
    assert single.lam == max(LAMBDA_GRID) * 1e-12


def test_a_vector_without_its_row_is_refused_and_the_module_keeps_lam():
    from icmlora.generators.ridge import RidgeGenerator

    with pytest.raises(ValueError, match=r"^ridge needs one target row per task vector, got 3 vectors and 2 rows$"):
        fit_ridge(torch.randn(3, 4), torch.randn(2, 5), 1.0)
    with pytest.raises(ValueError, match="got 0 vectors and 0 rows"):
        fit_ridge(torch.randn(0, 4), torch.randn(0, 5), 1.0)
    fitted = fit_ridge(torch.randn(3, 4), torch.randn(3, 5), 0.7)
    assert RidgeGenerator.from_map(fitted).config.lam == 0.7
