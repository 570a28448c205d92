"""The weighted k-NN protocol against a brute-force reference, backend agreement, and slot analysis rules."""
from __future__ import annotations

import math

import pytest
import torch

import eval_knn
from sparo_dino.eval import knn


def brute_force_scores(train, train_labels, test, num_classes, k, temperature):
    """Independent reference: python loops over pairs, cosine, sort, exp(sim / T) per class."""
    scores = []
    for query in test.tolist():
        qn = math.sqrt(sum(v * v for v in query))
        sims = []
        for row, label in zip(train.tolist(), train_labels.tolist()):
            rn = math.sqrt(sum(v * v for v in row))
            sims.append((sum(a * b for a, b in zip(query, row)) / (qn * rn), label))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


def random_problem(num_train=60, num_test=17, dim=12, num_classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(num_train, dim, generator=gen) * 3
    test = torch.randn(num_test, dim, generator=gen)
    labels = torch.randint(num_classes, (num_train,), generator=gen)
    return train, labels, test


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_weighted_knn_matches_brute_force(backend, k):
    train, labels, test = random_problem()
    expected = brute_force_scores(train, labels, test, 4, k, 0.07)
    got = eval_knn.weighted_knn(train, labels, test, num_classes=4, k=k, temperature=0.07, backend=backend)
    assert got.shape == (17, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_faiss_equals_torch_on_larger_problem():
    train, labels, test = random_problem(num_train=3000, num_test=400, dim=64, num_classes=10, seed=1)
    for_faiss = knn.knn_scores(train, labels, test, 10, [10, 20, 100, 200], 0.07, backend="faiss")
    for_torch = knn.knn_scores(train, labels, test, 10, [10, 20, 100, 200], 0.07, backend="torch")
    for k in for_torch:
        torch.testing.assert_close(for_faiss[k], for_torch[k], rtol=1e-4, atol=1e-5)
        assert torch.equal(for_faiss[k].argmax(1), for_torch[k].argmax(1))


def test_default_arguments_are_the_dino_protocol():
    train, labels, test = random_problem()
    torch.testing.assert_close(eval_knn.weighted_knn(train, labels, test, 4),
                               brute_force_scores(train, labels, test, 4, 20, 0.07).float(), rtol=1e-4, atol=1e-6)


def test_k_larger_than_train_set_is_clipped():
    train, labels, test = random_problem(num_train=7)
    clipped = knn.weighted_knn(train, labels, test, 4, k=200, backend="torch")
    torch.testing.assert_close(clipped, knn.weighted_knn(train, labels, test, 4, k=7, backend="torch"))


def test_features_are_normalized_inside():
    train, labels, test = random_problem()
    scaled = train * torch.rand(train.shape[0], 1) * 100
    torch.testing.assert_close(knn.weighted_knn(scaled, labels, test, 4, backend="torch"),
                               knn.weighted_knn(train, labels, test, 4, backend="torch"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_tiny_and_empty_test_sets(backend):
    train, labels, test = random_problem()
    assert knn.weighted_knn(train, labels, test[:1], 4, backend=backend).shape == (1, 4)
    assert knn.weighted_knn(train, labels, test[:0], 4, backend=backend).shape == (0, 4)


def test_topk_accuracy_clips_top5_to_number_of_classes():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = knn.topk_accuracy(scores, torch.tensor([1, 1, 0]))
    assert top1 == pytest.approx(100 / 3)
    assert top5 == 100.0


def test_bad_inputs_raise_clear_errors():
    train, labels, test = random_problem()
    with pytest.raises(ValueError, match="labels must lie in"):
        knn.weighted_knn(train, labels, test, num_classes=2)
    with pytest.raises(ValueError, match="dim"):
        knn.weighted_knn(train, labels, test[:, :5], 4)
    with pytest.raises(ValueError, match="backend"):
        knn.weighted_knn(train, labels, test, 4, backend="annoy")


def slot_features(informative_slot, num, num_slots=4, slot_dim=3, num_classes=3, seed=0):
    """Features whose `informative_slot` holds a class prototype plus noise; every other slot is pure noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % num_classes
    features = torch.randn(num, num_slots, slot_dim, generator=gen)
    prototypes = torch.eye(slot_dim)[:num_classes] * 10
    features[:, informative_slot] += prototypes[labels]
    return features.reshape(num, -1), labels


def test_per_slot_accuracy_finds_the_informative_slot():
    train, train_labels = slot_features(2, 90, seed=0)
    test, test_labels = slot_features(2, 30, seed=1)
    accuracies = knn.per_slot_top1(train, train_labels, test, test_labels, num_slots=4, num_classes=3, k=5,
                                   backend="torch")
    assert accuracies[2] == 100.0
    assert max(accuracies[:2] + accuracies[3:]) < 80.0


def test_slot_selection_uses_the_train_holdout_only():
    # select_slots accepts no test data at all; the pipeline test in test_eval_knn.py shows the test set is unused.
    train, train_labels = slot_features(1, 120, seed=0)
    selected, holdout_accuracies = knn.select_slots(train, train_labels, num_slots=4, num_select=1, num_classes=3,
                                                    holdout_fraction=0.25, k=5, backend="torch")
    assert selected == [1]
    assert holdout_accuracies[1] == max(holdout_accuracies) and len(holdout_accuracies) == 4


def test_holdout_split_is_a_reproducible_partition():
    fit, holdout = knn.holdout_split(50, 0.2, seed=3)
    assert len(holdout) == 10 and len(fit) == 40
    assert sorted(torch.cat([fit, holdout]).tolist()) == list(range(50))
    again = knn.holdout_split(50, 0.2, seed=3)
    assert torch.equal(fit, again[0]) and torch.equal(holdout, again[1])
    with pytest.raises(ValueError, match="empty"):
        knn.holdout_split(3, 0.1)


def test_keep_slots_takes_whole_slot_blocks():
    features = torch.arange(24.0).reshape(2, 12)  # 4 slots of dim 3
    kept = knn.keep_slots(features, 4, [2, 0])
    assert kept.tolist() == [[6, 7, 8, 0, 1, 2], [18, 19, 20, 12, 13, 14]]


class FakeGpuIndexConfig:
    """Stands in for faiss.GpuIndexFlatConfig (absent from faiss-cpu)."""
    device = 0


class FakeGpuIndex:
    """Stands in for faiss.GpuIndexFlatIP on a machine without GPU: records the GPU it was put on, searches exactly."""
    built = 0
    devices: list[int] = []

    def __init__(self, resources, dim, config):
        FakeGpuIndex.built += 1
        FakeGpuIndex.devices.append(config.device)
        self.index = knn.faiss.IndexFlatIP(dim)

    def add(self, vectors):
        self.index.add(vectors)

    def search(self, queries, k):
        return self.index.search(queries, k)


def test_search_device_decides_whether_faiss_uses_its_gpu(monkeypatch):
    """eval_knn --use_cuda false passes a CPU device: faiss must then keep the bank on the CPU even with a GPU."""
    monkeypatch.setattr(knn.faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(knn.faiss, "GpuIndexFlatIP", FakeGpuIndex, raising=False)
    monkeypatch.setattr(knn.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(knn.faiss, "GpuIndexFlatConfig", FakeGpuIndexConfig, raising=False)
    knn._faiss_gpu_resources.cache_clear()
    train, labels, test = random_problem()
    expected = brute_force_scores(train, labels, test, 4, 5, 0.07)
    FakeGpuIndex.built, FakeGpuIndex.devices = 0, []
    for device, gpu_indexes in ((torch.device("cpu"), 0), ("cpu", 0), (None, 1), (torch.device("cuda"), 2),
                                ("cuda:3", 3)):
        got = knn.weighted_knn(train, labels, test, 4, k=5, backend="faiss", device=device)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
        assert FakeGpuIndex.built == gpu_indexes, device
    assert FakeGpuIndex.devices == [0, 0, 3]  # rank 3's local GPU, not faiss's default GPU 0
    knn._faiss_gpu_resources.cache_clear()  # drop the fake resources


def test_a_gpu_search_that_faiss_cpu_cannot_do_is_said_not_hidden(monkeypatch):
    """faiss-cpu and --use_cuda: auto searches with torch on the GPU; an explicit faiss warns and says it ran on
    the CPU (the results JSON records the plan, so it cannot claim cuda)."""
    monkeypatch.setattr(knn.faiss, "get_num_gpus", lambda: 0, raising=False)
    cuda = torch.device("cuda", 2)
    assert knn.plan_search("auto", cuda) == knn.SearchPlan("torch", cuda, "fp32")
    with pytest.warns(UserWarning, match="faiss has no GPU"):
        assert knn.plan_search("faiss", cuda) == knn.SearchPlan("faiss", torch.device("cpu"), "fp32")
    assert knn.plan_search("auto", "cpu") == knn.SearchPlan("faiss", torch.device("cpu"), "fp32")
    assert knn.plan_search("auto", None, "fp16") == knn.SearchPlan("torch", torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="--bank_dtype fp16 needs the torch backend"):
        knn.plan_search("faiss", "cpu", "fp16")
    with pytest.raises(ValueError, match="unknown k-NN bank dtype 'bf16'"):
        knn.plan_search("torch", "cpu", "bf16")


@pytest.mark.parametrize("bank_rows,block", [(7, 7 * 5), (1, 3), (60, 60)])
def test_search_chunked_over_queries_and_bank_merges_to_the_exact_top_k(monkeypatch, bank_rows, block):
    """Bank chunks of 7 (or 1) rows and query chunks of 5 (or 3): top-k merged across chunks is the brute force."""
    monkeypatch.setattr(knn, "_BANK_CHUNK_ROWS", bank_rows)
    monkeypatch.setattr(knn, "_TORCH_BLOCK_ELEMENTS", block)
    train, labels, test = random_problem()
    for k in (1, 5, 20, 60):
        got = knn.weighted_knn(train, labels, test, 4, k=k, backend="torch")
        torch.testing.assert_close(got.double(), brute_force_scores(train, labels, test, 4, k, 0.07), rtol=1e-4,
                                   atol=1e-6)


def test_fp16_bank_stays_within_the_stated_tolerance_of_fp32():
    """Normalized, then cast: every sorted top-k similarity within 2**-11 of the fp32 reference (|a.(b - fp16(b))|
    <= 2**-11 for unit vectors), votes within exp(2**-11 / T) - 1 = 0.7% where the neighbours agree, and the
    same predictions but for near ties."""
    gen = torch.Generator().manual_seed(3)
    centers = torch.randn(10, 256, generator=gen)
    train_labels = torch.randint(10, (3000,), generator=gen)
    test_labels = torch.randint(10, (500,), generator=gen)
    train = centers[train_labels] + 2.0 * torch.randn(3000, 256, generator=gen)
    test = centers[test_labels] + 2.0 * torch.randn(500, 256, generator=gen)
    sims32, idx32 = knn.search_topk(train, test, 20, backend="torch")
    sims16, idx16 = knn.search_topk(train, test, 20, backend="torch", bank_dtype="fp16")
    assert sims16.dtype == torch.float32
    assert (sims16 - sims32).abs().max() <= 2 ** -11 + 1e-6
    assert 0 < (sims16 - sims32).abs().max()  # the bank really was rounded
    scores32 = knn.weighted_knn(train, train_labels, test, 10, backend="torch")
    scores16 = knn.weighted_knn(train, train_labels, test, 10, backend="torch", bank_dtype="fp16")
    same = (idx16 == idx32).all(dim=1)
    assert same.float().mean() > 0.9
    ratio = scores16[same] / scores32[same].clamp_min(1e-30)
    assert ((ratio - 1).abs()[scores32[same] > 0]).max() <= math.exp(2 ** -11 / 0.07) - 1 + 1e-5
    assert (scores16.argmax(1) == scores32.argmax(1)).float().mean() >= 0.99
    top1_32 = knn.topk_accuracy(scores32, test_labels)[0]
    assert knn.topk_accuracy(scores16, test_labels)[0] == pytest.approx(top1_32, abs=1.0)


def test_torch_search_runs_on_the_given_device():
    train, labels, test = random_problem()
    got = knn.weighted_knn(train, labels, test, 4, k=5, backend="torch", device="cpu")
    torch.testing.assert_close(got.double(), brute_force_scores(train, labels, test, 4, 5, 0.07), rtol=1e-4,
                               atol=1e-6)
    with pytest.raises((RuntimeError, AssertionError)):  # proof that the device is used: "meta" cannot search
        knn.weighted_knn(train, labels, test, 4, k=5, backend="torch", device="meta")
