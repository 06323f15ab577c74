"""Arms from resolved configs, t intervals and Welch tests against hand-computed values, sentences, run counts."""

import math

import pytest
import scipy.stats

from gpt_lightning.analysis.stats import (Difference, arm_key, arm_label, compare_means, describe, finding,
                                          group_into_arms, runs_needed)


def config(seed=1337, kv_groups=2, lr=6e-4, run="2024-01-01/00-00-00/0", **model):
    """A resolved config as Hydra writes it: seed, its copies and the output paths all follow the run."""
    out = f"/outputs/multirun/{run}"
    return {
        "seed": seed, "ckpt_path": None,
        "data": {"seed": seed, "name": "machado"},
        "attention": {"type": "gqa", "n_heads": 8, "kv_groups": kv_groups},
        "model": {"n_layer": 4, "n_embd": 256, **model},
        "optim": {"lr": lr, "warmup_steps": 20},
        "logger": {"tensorboard": {"save_dir": out, "name": "tb"}},
        "callbacks": {"model_checkpoint": {"dirpath": f"{out}/checkpoints", "monitor": "val/loss"}},
        "hydra": {"job": {"num": seed}, "runtime": {"output_dir": out}},
    }


# ---------------------------------------------------------------------------------------------------- arms

def test_seeds_and_paths_do_not_split_an_arm():
    runs = [(f"s{s}", config(seed=s, run=f"x/{s}")) for s in (1, 2, 3)]
    assert len({arm_key(c) for _, c in runs}) == 1
    assert group_into_arms(runs) == {"all runs": ["s1", "s2", "s3"]}


def test_kv_groups_split_arms_ordered_numerically():
    runs = [(f"g{g}s{s}", config(seed=s, kv_groups=g, run=f"{g}/{s}")) for g in (8, 1, 4, 2) for s in (1, 2)]
    arms = group_into_arms(runs)
    assert list(arms) == ["kv_groups=1", "kv_groups=2", "kv_groups=4", "kv_groups=8"]  # 8 after 2, not before
    assert arms["kv_groups=4"] == ["g4s1", "g4s2"]


def test_seed_plus_another_change_is_another_arm():
    a, b = config(seed=1, lr=6e-4), config(seed=2, lr=3e-4)
    assert arm_key(a) != arm_key(b)
    assert sorted(group_into_arms([("a", a), ("b", b)]).values()) == [["a"], ["b"]]


def test_any_setting_outside_the_ignore_list_splits_arms():
    a, b = config(), config()
    b["generation"] = {"top_k": 40}
    a["generation"] = {"top_k": 50}
    assert arm_key(a) != arm_key(b)


def test_labels_show_only_the_keys_that_differ():
    configs = [config(kv_groups=1), config(kv_groups=2), config(kv_groups=2, match_params=True)]
    labels = list(arm_label(configs).values())
    assert labels == ["kv_groups=1, model.match_params=unset", "kv_groups=2, model.match_params=true",
                      "kv_groups=2, model.match_params=unset"]
    assert not any("lr" in lab or "n_layer" in lab or "seed" in lab for lab in labels)
    assert list(arm_label([config(kv_groups=g) for g in (1, 2)]).values()) == ["kv_groups=1", "kv_groups=2"]


def test_label_keeps_a_string_that_looks_like_a_number_apart():
    labels = arm_label([config(kv_groups=1), config(kv_groups="1")])
    assert sorted(labels.values()) == ['kv_groups="1"', "kv_groups=1"]


# ---------------------------------------------------------------------------------------------- statistics

def test_describe_matches_the_t_interval_by_hand():
    """[1,2,3,4]: mean 2.5, s² = (2.25+0.25+0.25+2.25)/3 = 5/3, s = 1.29099; t(0.975, 3) = 3.182446305284263
    (tables), half-width = 3.182446 · 1.29099 / 2 = 2.05426, CI (0.44574, 4.55426)."""
    s = describe([1, 2, 3, 4])
    assert (s.n, s.mean) == (4, 2.5)
    assert s.std == pytest.approx(math.sqrt(5 / 3)) == pytest.approx(1.2910, abs=1e-4)
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (s.ci_low, s.ci_high, s.half_width) == pytest.approx((2.5 - half, 2.5 + half, half), rel=1e-12)
    assert (round(s.ci_low, 4), round(s.ci_high, 4)) == (0.4457, 4.5543)


def test_describe_drops_missing_values_and_needs_two_for_a_spread():
    assert describe([1, None, float("nan"), 2, 3, 4]) == describe([1, 2, 3, 4])
    one = describe([float("nan"), 3.0])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 3.0, None, None, None)
    assert describe([None]).n == 0 and describe([]).mean is None


def test_welch_by_hand():
    """a = [4.10, 4.12, 4.14], b = [4.20, 4.25, 4.30]: means 4.12 and 4.25, diff -0.13;
    variances (0.02² + 0 + 0.02²)/2 = 0.0004 and (0.05² + 0 + 0.05²)/2 = 0.0025;
    se = √(0.0004/3 + 0.0025/3) = 0.0310913; Welch df = se⁴ / ((0.0004/3)²/2 + (0.0025/3)²/2) = 2.62402
    (fewer than the pooled 4: b is the noisier side); t = -0.13 / se = -4.18124, two-sided p = 0.0323."""
    d = compare_means([4.10, 4.12, 4.14], [4.20, 4.25, 4.30])
    se = math.sqrt(0.0004 / 3 + 0.0025 / 3)
    df = se ** 4 / ((0.0004 / 3) ** 2 / 2 + (0.0025 / 3) ** 2 / 2)
    half = scipy.stats.t.ppf(0.975, df) * se
    assert (d.n_a, d.n_b) == (3, 3)
    assert d.diff == pytest.approx(-0.13, abs=1e-12)
    assert d.df == pytest.approx(df, rel=1e-9) == pytest.approx(2.62402, abs=1e-5)
    assert (d.ci_low, d.ci_high) == pytest.approx((-0.13 - half, -0.13 + half), rel=1e-9)
    assert d.p_value == pytest.approx(2 * scipy.stats.t.sf(abs(-0.13 / se), df), abs=1e-9)
    assert f"{d.p_value:.3g}" == "0.0323"
    assert d.ci_high < 0  # the interval excludes 0 exactly when p < 0.05: one test, two views


def test_one_run_on_a_side_gives_no_interval_and_says_so():
    d = compare_means([4.1], [4.0, 4.02, 4.04])
    assert d.diff == pytest.approx(0.08) and (d.ci_low, d.ci_high, d.p_value) == (None, None, None)
    sentence = finding("test bpb", "kv_groups=1", "MHA", d)
    assert "n = 1" in sentence and "no interval" in sentence and "+0.080" in sentence
    assert "±" not in sentence and "p =" not in sentence


def test_no_spread_on_either_side_gives_no_test():
    d = compare_means([1.0, 1.0], [2.0, 2.0, float("nan")])
    assert (d.n_b, d.diff, d.p_value, d.ci_low) == (2, -1.0, None, None)


# ------------------------------------------------------------------------------------------------ sentences

def test_finding_with_an_interval_holding_zero_claims_nothing():
    d = compare_means([1.000, 1.020, 1.010], [1.005, 1.015, 1.000])
    assert d.ci_low < 0 < d.ci_high
    sentence = finding("test bpb", "kv_groups=2 (GQA)", "MHA", d)
    assert "no difference detected at n = 3" in sentence
    assert "95% CI" in sentence and f"p = {d.p_value:.2g}" in sentence
    assert not any(w in sentence.lower() for w in ("better", "worse"))


def test_finding_with_a_clear_difference_gives_signed_value_and_half_width():
    d = Difference(n_a=3, n_b=3, mean_a=1.221, mean_b=1.2, diff=0.021, ci_low=0.015, ci_high=0.027,
                   half_width=0.006, p_value=0.0041)
    sentence = finding("test bpb", "kv_groups=1 (MQA)", "MHA", d, extra="KV cache 1/8 of MHA's")
    assert sentence == ("kv_groups=1 (MQA): test bpb +0.021 ± 0.0060 vs MHA (p = 0.0041, n = 3 each); "
                        "KV cache 1/8 of MHA's")
    lower = finding("val loss", "kv_groups=1", "MHA", compare_means([4.10, 4.12, 4.14], [4.20, 4.25, 4.30]), unit="nats")
    assert lower.startswith("kv_groups=1: val loss -0.130 ± 0.107 nats vs MHA (p = 0.032")
    tiny_p = Difference(n_a=3, n_b=4, mean_a=1, mean_b=0, diff=1.0, ci_low=0.9, ci_high=1.1, half_width=0.1,
                        p_value=2e-6)
    assert "(p < 0.001, n = 3 vs 4)" in finding("m", "a", "b", tiny_p)


# -------------------------------------------------------------------------------------------------- planning

def test_runs_needed_grows_as_the_difference_shrinks():
    big, medium = runs_needed(0.01, 0.01, 0.02), runs_needed(0.01, 0.01, 0.01)
    assert 2 <= big < medium
    assert medium == 17  # Cohen's table: d = 1 at α = 0.05, power 0.8 -> 17 per group
    assert runs_needed(0.01, 0.01, 0.0005) > 1000  # a difference 1/20 of the seed noise
    assert runs_needed(0.01, 0.01, 1e-5) is None  # past the 10_000 cap
    assert runs_needed(0.01, 0.01, 0.0) is None


def test_runs_needed_is_the_smallest_n_reaching_the_power():
    """Check the answer by simulation-free bracketing: n reaches 80% power (noncentral t), n - 1 does not."""
    sa, sb, delta = 0.02, 0.05, 0.06
    n = runs_needed(sa, sb, delta)

    def power(k):
        var = (sa ** 2 + sb ** 2) / k
        df = (k - 1) * (sa ** 2 + sb ** 2) ** 2 / (sa ** 4 + sb ** 4)
        crit = scipy.stats.t.ppf(0.975, df)
        ncp = delta / math.sqrt(var)
        return scipy.stats.nct.sf(crit, df, ncp) + scipy.stats.nct.cdf(-crit, df, ncp)

    assert power(n) >= 0.8 > power(n - 1)
    assert runs_needed(sa, sb, -delta) == n  # the sign of the difference does not matter
    assert runs_needed(sa, sb, delta, power=0.95) > n


def test_runs_needed_refuses_no_noise():
    with pytest.raises(ValueError):
        runs_needed(0.0, 0.0, 0.1)
