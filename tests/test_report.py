"""report.py: per-query rankings, the error analysis (rank buckets, the queries most wrong) and the HTML report,
against brute-force loops."""

import html.parser

import numpy as np
import pytest

from uit_jax import metrics, report


def _case(seed=3, q=30, g=20, ids=6, ties=False):
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([np.arange(ids), rng.integers(0, ids, g - ids)])
    q_pids = rng.integers(0, ids, q)
    sim = rng.normal(size=(q, g)) + 0.8 * (q_pids[:, None] == g_pids[None, :])
    if ties:
        sim = np.round(sim * 2) / 2  # many exact ties, positives among them
    return sim.astype(np.float32), q_pids, g_pids


@pytest.mark.parametrize("ties", [False, True])
def test_rankings_and_first_correct_image_against_a_brute_force_loop(ties):
    sim, q, g = _case(ties=ties)
    paths = [f"p{j}" for j in range(len(g))]
    rows = report.rankings(sim, q, g, [f"c{i}" for i in range(len(q))], paths, k=5, block=7)
    for i, row in enumerate(rows):
        order = sorted(range(len(g)), key=lambda j: -sim[i, j])  # stable: ties by gallery index
        correct = [n for n, j in enumerate(order) if g[j] == q[i]]
        assert row["first_correct_rank"] == correct[0] + 1
        assert row["first_correct_path"] == paths[order[correct[0]]]
        assert row["first_correct_score"] == pytest.approx(float(sim[i, order[correct[0]]]), abs=1e-6)
        assert row["top_paths"] == [paths[j] for j in order[:5]]
    assert 100 * np.mean([r["first_correct_rank"] == 1 for r in rows]) == pytest.approx(
        metrics.retrieval_metrics(sim, q, g)["R1"], abs=1e-9
    )


def test_rank_buckets_and_the_most_wrong_queries():
    ranked = [{"query": i, "first_correct_rank": r, "ap": ap} for i, (r, ap) in enumerate(
        [(1, 1.0), (3, 0.3), (5, 0.2), (6, 0.1), (11, 0.05), (40, 0.02), (1, 0.9), (40, 0.01)]
    )]  # fmt: skip
    buckets = report.rank_buckets(ranked)
    assert buckets == {"1": 25.0, "2-5": 25.0, "6-10": 12.5, ">10": 37.5}
    assert sum(buckets.values()) == 100.0
    # the latest first correct image first; among equals the lower AP
    assert [q["query"] for q in report.most_wrong(ranked, 4)] == [7, 5, 4, 3]


def test_the_report_shows_the_error_analysis(tmp_path):
    sim, q, g = _case(q=40)
    paths = [f"img{j}.png" for j in range(len(g))]
    rows = report.rankings(sim, q, g, [f"caption {i}" for i in range(len(q))], paths)
    pixels = {p: np.full((8, 4, 3), 10 * j, np.uint8) for j, p in enumerate(paths)}
    jsonl, page = report.write_split_report(str(tmp_path), "test", rows, pixels.__getitem__, title="t", n_wrong=3)
    text = open(page).read()
    assert "Where the first correct image lands" in text
    buckets = report.rank_buckets(rows)
    for v in buckets.values():
        assert f"<td>{v:.2f}</td>" in text

    class Parser(html.parser.HTMLParser):
        headings, imgs = [], 0

        def handle_starttag(self, tag, attrs):
            self.imgs += tag == "img"

        def handle_data(self, data):
            if data.startswith("["):
                self.headings.append(data)

    p = Parser()
    p.feed(text)
    wrong = [h for h in p.headings if h.startswith("[most wrong]")]
    assert len(wrong) == 3 and wrong[0].startswith(f"[most wrong] {report.most_wrong(rows, 1)[0]['caption']}")
    # each most-wrong query: its top 5 and the image it should have found; then the usual best/median/worst sample
    assert p.imgs == 3 * 6 + 10 * len(report.sample(rows, 4))
