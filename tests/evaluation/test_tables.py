"""Result tables: statistics worked by hand, bold and asterisk placement, t-tests against scipy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from hycam.evaluation.tables import load_results, markdown_overall, markdown_per_task, summarize


def _record(method: str, seed: int, ppl: float, bleu: float, rouge: float, tasks=("dolly", "webgpt")) -> dict:
    """A record whose every task, and so its average, has the given scores."""
    scores = {"ppl": ppl, "bleu": bleu, "rouge_l": rouge}
    return {"method": method, "seed": seed, "tasks": {t: dict(scores) for t in tasks}, "average": dict(scores)}


def _rows(markdown: str) -> dict[str, list[str]]:
    """Table body cells by method name (the header and the separator row left out)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells[0] not in ("Method", "---"):
                rows[cells[0]] = cells[1:]
    return rows


def _three_seeds(method: str, ppls: list[float], bleus: list[float], rouges: list[float]) -> list[dict]:
    return [_record(method, seed, p, b, r) for seed, p, b, r in zip((1, 2, 3), ppls, bleus, rouges)]


HYCAM_PPL, LORA_PPL = [3.60, 3.61, 3.62], [3.75, 3.76, 3.77]
CLEAR = _three_seeds("HyCAM", HYCAM_PPL, [0.170, 0.171, 0.172], [0.26, 0.27, 0.25]) + _three_seeds(
    "LoRA", LORA_PPL, [0.140, 0.145, 0.150], [0.22, 0.23, 0.21]
)


def test_mean_and_sample_std_over_seeds() -> None:
    # PPL 3.0, 3.2, 3.4: mean 3.2, deviations -0.2, 0, 0.2, sample variance (0.04 + 0.04) / 2 = 0.04.
    results = _three_seeds("HyCAM", [3.0, 3.2, 3.4], [0.1, 0.2, 0.3], [0.2, 0.2, 0.2])
    column = summarize(results)["overall"]["ppl"]
    assert column["mean"]["HyCAM"] == pytest.approx(3.2)
    assert column["std"]["HyCAM"] == pytest.approx(0.2)
    assert column["n"]["HyCAM"] == 3
    assert summarize(results)["overall"]["bleu"]["std"]["HyCAM"] == pytest.approx(0.1)


def test_overall_uses_task_mean_when_record_has_no_average() -> None:
    record = {
        "method": "LoRA",
        "seed": 0,
        "tasks": {"a": {"ppl": 2.0, "bleu": 0.1, "rouge_l": 0.3}, "b": {"ppl": 4.0, "bleu": 0.2, "rouge_l": 0.5}},
    }
    overall = summarize([record])["overall"]
    assert overall["ppl"]["mean"]["LoRA"] == pytest.approx(3.0)
    assert overall["rouge_l"]["mean"]["LoRA"] == pytest.approx(0.4)


def test_bold_marks_lowest_ppl_and_highest_bleu_rouge() -> None:
    # A has the lower PPL, B the higher BLEU and ROUGE-L.
    rows = _rows(markdown_overall([_record("A", 0, 3.0, 0.10, 0.20), _record("B", 0, 3.5, 0.15, 0.25)]))
    assert rows["A"] == ["**3.000**", "0.100", "0.200"]
    assert rows["B"] == ["3.500", "**0.150**", "**0.250**"]


def test_per_task_bold_follows_each_task() -> None:
    a = _record("A", 0, 3.0, 0.10, 0.20)
    b = _record("B", 0, 3.5, 0.15, 0.25)
    b["tasks"]["webgpt"]["ppl"] = 2.0  # B wins PPL on webgpt only
    markdown = markdown_per_task([a, b])
    assert "| Method | dolly PPL↓ | dolly BLEU-4↑ | dolly ROUGE-L↑ | webgpt PPL↓ |" in markdown
    rows = _rows(markdown)
    assert rows["A"][0] == "**3.000**" and rows["A"][3] == "3.000"
    assert rows["B"][0] == "3.500" and rows["B"][3] == "**2.000**"


def test_clear_difference_gets_asterisk_with_scipys_p_value() -> None:
    test = summarize(CLEAR)["overall"]["ppl"]["test"]
    expected = stats.ttest_ind(HYCAM_PPL, LORA_PPL, equal_var=False).pvalue
    assert (test["method"], test["baseline"]) == ("HyCAM", "LoRA")
    assert test["p_value"] == pytest.approx(expected)
    assert expected < 0.05 and test["significant"]
    assert _rows(markdown_overall(CLEAR))["HyCAM"][0] == "**3.610 ± 0.010**\\*"


def test_overlapping_seeds_get_no_asterisk() -> None:
    hycam, lora = [3.60, 3.70, 3.65], [3.66, 3.61, 3.69]
    others = [0.2, 0.21, 0.22]
    results = _three_seeds("HyCAM", hycam, others, others) + _three_seeds("LoRA", lora, others, others)
    test = summarize(results)["overall"]["ppl"]["test"]
    expected = stats.ttest_ind(hycam, lora, equal_var=False).pvalue
    assert test["p_value"] == pytest.approx(expected)
    assert expected > 0.05 and not test["significant"]
    assert _rows(markdown_overall(results))["HyCAM"][0] == "**3.650 ± 0.050**"


def test_baseline_methods_choose_the_comparison() -> None:
    # The ablation is the runner-up, but the test must be against the best named baseline, LoRA.
    ablation = _three_seeds("Ablation", [3.64, 3.65, 3.66], [0.16, 0.17, 0.15], [0.24, 0.25, 0.23])
    full = _three_seeds("Full", [3.90, 3.95, 4.00], [0.10, 0.11, 0.12], [0.20, 0.21, 0.22])
    results = CLEAR + ablation + full
    assert summarize(results)["overall"]["ppl"]["test"]["baseline"] == "Ablation"
    test = summarize(results, baseline_methods=["LoRA", "Full"])["overall"]["ppl"]["test"]
    assert test["baseline"] == "LoRA"
    assert test["p_value"] == pytest.approx(stats.ttest_ind(HYCAM_PPL, LORA_PPL, equal_var=False).pvalue)


def test_no_test_when_a_baseline_is_best() -> None:
    summary = summarize(CLEAR, baseline_methods=["HyCAM"])
    assert summary["overall"]["ppl"]["test"] is None
    assert "\\*" not in markdown_overall(CLEAR, baseline_methods=["HyCAM"]).split("\n\n")[0]


def test_single_seed_has_no_std_and_no_test() -> None:
    results = [_record("HyCAM", 2333, 3.0, 0.2, 0.3), _record("LoRA", 2333, 9.0, 0.01, 0.02)]
    column = summarize(results)["overall"]["ppl"]
    assert column["std"] == {"HyCAM": None, "LoRA": None}
    assert column["test"] is None
    rows = _rows(markdown_overall(results))
    assert rows["HyCAM"] == ["**3.000**", "**0.200**", "**0.300**"]
    assert rows["LoRA"] == ["9.000", "0.010", "0.020"]


def test_unknown_baseline_rejected() -> None:
    with pytest.raises(ValueError, match=r"baseline_methods \['LORA'\] are not among the methods"):
        summarize(CLEAR, baseline_methods=["LORA"])


def test_duplicate_method_seed_rejected() -> None:
    with pytest.raises(ValueError, match=r"results\[1\]: method 'A' seed 0 already read from results\[0\]"):
        summarize([_record("A", 0, 3.0, 0.1, 0.2), _record("A", 0, 3.1, 0.1, 0.2)])


def test_differing_task_sets_rejected() -> None:
    with pytest.raises(ValueError, match=r"results\[1\]: tasks \['dolly'\] differ"):
        summarize([_record("A", 0, 3.0, 0.1, 0.2), _record("B", 0, 3.0, 0.1, 0.2, tasks=("dolly",))])


def test_load_results_reads_single_records_and_lists(tmp_path: Path) -> None:
    first, rest = CLEAR[0], CLEAR[1:]
    (tmp_path / "one.json").write_text(json.dumps(first))
    (tmp_path / "many.json").write_text(json.dumps(rest))
    assert load_results([tmp_path / "one.json", tmp_path / "many.json"]) == CLEAR


def test_load_results_names_file_with_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_results([path])


def test_load_results_names_file_and_field_with_missing_metric(tmp_path: Path) -> None:
    record = _record("A", 0, 3.0, 0.1, 0.2)
    del record["tasks"]["webgpt"]["bleu"]
    path = tmp_path / "a.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=r"a.json\[0\]: tasks.webgpt.bleu must be a finite number, got None"):
        load_results([path])


def test_load_results_names_both_files_of_a_duplicate(tmp_path: Path) -> None:
    for name in ("x.json", "y.json"):
        (tmp_path / name).write_text(json.dumps(CLEAR[0]))
    with pytest.raises(ValueError, match=r"y.json: method 'HyCAM' seed 1 already read from .*x.json"):
        load_results([tmp_path / "x.json", tmp_path / "y.json"])


def test_empty_results_rejected() -> None:
    with pytest.raises(ValueError, match="no result records"):
        summarize([])


def _caption(markdown: str) -> str:
    return markdown.strip().split("\n\n")[-1]


def test_one_run_alone_is_neither_bold_nor_captioned_with_seeds_or_tests() -> None:
    results = [_record("HyCAM", 2333, 3.0, 0.2, 0.3)]
    for markdown in (markdown_overall(results), markdown_per_task(results)):
        assert "**" not in markdown.split("\n\n")[0]
        assert _rows(markdown)["HyCAM"][:3] == ["3.000", "0.200", "0.300"]
        assert _caption(markdown) == "One run."


def test_one_method_over_seeds_has_a_std_and_no_bold() -> None:
    markdown = markdown_overall(_three_seeds("HyCAM", HYCAM_PPL, [0.1, 0.2, 0.3], [0.2, 0.2, 0.2]))
    assert _rows(markdown)["HyCAM"][0] == "3.610 ± 0.010"
    assert _caption(markdown) == "Mean ± sample std over seeds."


def test_the_caption_names_bold_and_the_test_only_where_the_table_has_them() -> None:
    single = [_record("HyCAM", 2333, 3.0, 0.2, 0.3), _record("LoRA", 2333, 9.0, 0.01, 0.02)]
    assert _caption(markdown_overall(single)) == "One seed per method. Best per column in **bold**."
    assert _caption(markdown_per_task(CLEAR)) == _caption(markdown_overall(CLEAR)) == (
        "Mean ± sample std over seeds. Best per column in **bold**; \\* marks p < 0.05 in a two-sided Welch "
        "t-test of the best method against the best baseline.")
    untested = markdown_overall(CLEAR, baseline_methods=["HyCAM"])  # the best is a baseline in every column
    assert _caption(untested) == "Mean ± sample std over seeds. Best per column in **bold**."
