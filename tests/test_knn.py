import math

import pytest
import torch

from glsd_cli.eval.knn import knn_classify


def brute_force(train, ytrain, test, ytest, num_classes, k, T):
    """One test image at a time, explicit cosine similarities, explicit sort and vote."""
    top1 = top5 = 0
    for x, y in zip(test, ytest):
        sims = []
        for j, t in enumerate(train):
            cos = float(x @ t) / (float(x.norm()) * float(t.norm()))
            sims.append((cos, j))
        sims.sort(key=lambda p: -p[0])
        scores = [0.0] * num_classes
        for cos, j in sims[:min(k, len(train))]:
            scores[int(ytrain[j])] += math.exp(cos / T)
        ranked = sorted(range(num_classes), key=lambda c: -scores[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:min(5, num_classes)]
    n = len(test)
    return 100 * top1 / n, 100 * top5 / n


@pytest.mark.parametrize("n_train,n_test,classes", [(120, 37, 6), (50, 3, 10), (9, 2, 4)])
def test_knn_matches_brute_force(n_train, n_test, classes):
    torch.manual_seed(n_train)
    train = torch.randn(n_train, 8, dtype=torch.float64)
    test = torch.randn(n_test, 8, dtype=torch.float64)
    ytrain = torch.randint(0, classes, (n_train,))
    ytest = torch.randint(0, classes, (n_test,))
    ks = (1, 10, 20, 200)  # 200 > n_train: clamped to the bank size
    res = knn_classify(train, ytrain, test, ytest, classes, ks=ks, temperature=0.07, chunk=5)
    for k in ks:
        t1, t5 = brute_force(train, ytrain, test, ytest, classes, k, 0.07)
        assert res[k]["top1"] == pytest.approx(t1)
        assert res[k]["top5"] == pytest.approx(t5)


def test_knn_separable_clusters_are_perfect():
    centres = torch.eye(4) * 10
    train = torch.cat([centres + 0.1 * torch.randn(4, 4) for _ in range(5)])
    ytrain = torch.arange(4).repeat(5)
    res = knn_classify(train, ytrain, centres, torch.arange(4), 4, ks=(3,))
    assert res[3]["top1"] == 100.0
