"""Evaluation: ROUGE-L, seeded generation, reference NLL, the report and `mta eval`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from rich.progress import Progress
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mta_cli import evaluation
from mta_cli.cli_eval import eval_command
from mta_cli.evaluation import FileResult, ModelResult, evaluate, generate, reference_nll, render_table, rouge_l
from mta_cli.losses.kd import LogitHead
from mta_cli.records import Record, load_records
from tests import reference, tiny

PROMPTS = [
    "### Instruction:\nName three primary colors.\n\n### Response:\n",
    "The quick brown fox",
    "Tell me about the history of the Roman Empire and its famous emperors.\n\n### Response:\n",
    "Alice",
]
RECORDS = [
    Record(PROMPTS[0], ("Red, blue and yellow are the primary colors.", "Red, blue, yellow."), 1),
    Record(PROMPTS[1], (" jumps over the lazy dog.",), 2),
    Record(PROMPTS[2], ("It was long and full of emperors.",), 3),
]


@pytest.fixture(scope="module")
def model(bl_tok):
    return tiny.tiny_llama(bl_tok, seed=1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, bl_tok):
    return [str(tiny.save_tiny_model(tmp_path_factory.mktemp(f"m{seed}"), bl_tok, tiny.tiny_llama(bl_tok, seed=seed)))
            for seed in (1, 2)]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prompt_file, alpaca_file = d / "prompts.jsonl", d / "alpaca.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": r.prompt, "output": list(r.responses)}) + "\n"
                                   for r in RECORDS))
    alpaca_file.write_text(json.dumps({"instruction": "Name three primary colors.", "output": "Red, blue, yellow."})
                           + "\n")
    return [str(prompt_file), str(alpaca_file)]


def test_rouge_l_hand_values_and_max_over_references():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == 100.0
    assert rouge_l("the cat sat", ["a dog ran"]) == 0.0
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    assert rouge_l("the cat sat on the mat", ["a dog ran", "the cat is on the mat"]) == pytest.approx(500 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, refs = "Cats were running quickly home", ["the cat runs home", "a cat ran quickly"]
    direct = max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert rouge_l(pred, refs) == pytest.approx(100 * direct)


def test_sampling_is_reproducible_per_seed(model, bl_tok):
    rng = torch.get_rng_state()
    a = generate(model, bl_tok, PROMPTS, seed=10, max_new_tokens=12, batch_size=2)
    assert torch.equal(rng, torch.get_rng_state()), "generate must leave the caller's RNG state alone"
    assert generate(model, bl_tok, PROMPTS, seed=10, max_new_tokens=12, batch_size=2) == a
    assert generate(model, bl_tok, PROMPTS, seed=20, max_new_tokens=12, batch_size=2) != a
    assert len(a) == len(PROMPTS) and all(isinstance(s, str) for s in a)


def test_greedy_is_deterministic_and_batching_does_not_change_it(model, bl_tok):
    batched = generate(model, bl_tok, PROMPTS, seed=1, greedy=True, max_new_tokens=10, batch_size=4)
    assert generate(model, bl_tok, PROMPTS, seed=2, greedy=True, max_new_tokens=10, batch_size=4) == batched
    alone = [generate(model, bl_tok, [p], seed=0, greedy=True, max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)


def test_long_prompts_are_left_truncated(bl_tok):
    model = tiny.tiny_llama(bl_tok, seed=3)  # 256 positions
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    assert len(bl_tok(long_prompt)["input_ids"]) > 256
    tail = bl_tok.decode(bl_tok(long_prompt)["input_ids"][-(256 - 8):])
    kept = generate(model, bl_tok, [long_prompt], seed=0, greedy=True, max_new_tokens=8)
    assert kept == generate(model, bl_tok, [tail], seed=0, greedy=True, max_new_tokens=8)


def test_reference_nll_is_the_token_mean_cross_entropy(model, bl_tok):
    """The token-level mean over all records, and each record's own token mean (from the same batched pass,
    records reordered by length inside it), against one unpadded forward per record."""
    total, count, per_record = 0.0, 0, []
    for r in RECORDS:
        enc = bl_tok(r.text, return_offsets_mapping=True)
        ids = enc["input_ids"] + [bl_tok.eos_token_id]
        response = [i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(r.prompt)] + [len(ids) - 1]
        logits = model(torch.tensor([ids])).logits[0]
        targets = torch.tensor(response)
        record_total = F.cross_entropy(logits[targets - 1], torch.tensor(ids)[targets], reduction="sum").item()
        per_record.append(record_total / len(response))
        total += record_total
        count += len(response)
    result = reference_nll(model, bl_tok, RECORDS, batch_size=2)
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.per_record == pytest.approx(per_record, rel=1e-5)
    assert len(set(len(r.responses[0]) for r in RECORDS)) == len(RECORDS)  # lengths differ: the order is tested


def test_reference_nll_falls_back_to_the_full_logits_when_the_head_does_not_reproduce_them(model, bl_tok,
                                                                                         monkeypatch):
    """Scored from hidden states and the output head when that head reproduces the model's logits (checked on the
    first batch), else from the model's full logits: the same figures either way."""
    exact = reference_nll(model, bl_tok, RECORDS, batch_size=2)
    real_head = evaluation.output_head
    scorers = []

    def wrong_head(m):
        head = real_head(m)
        return LogitHead(head.weight, head.bias, scale=2.0)

    class Recorded(evaluation.ResponseScorer):
        def __init__(self, m):
            super().__init__(m)
            scorers.append(self)

    monkeypatch.setattr(evaluation, "ResponseScorer", Recorded)
    assert reference_nll(model, bl_tok, RECORDS, batch_size=2) == exact
    assert scorers[-1].exact_head is True
    monkeypatch.setattr(evaluation, "output_head", wrong_head)
    fallback = reference_nll(model, bl_tok, RECORDS, batch_size=2)
    assert scorers[-1].exact_head is False
    assert fallback.nll == pytest.approx(exact.nll, rel=1e-6)
    assert fallback.per_record == pytest.approx(exact.per_record, rel=1e-6)


def test_evaluate_greedy_reports_one_pass(model_dirs, data_files):
    with Progress(disable=True) as progress:
        report = evaluate(model_dirs[:1], data_files[:1], greedy=True, max_new_tokens=6, device="cpu",
                          progress=progress)
    assert [(t.completed, t.total) for t in progress.tasks] == [(2 * len(RECORDS), 2 * len(RECORDS))]
    result = report.to_json()["models"][0]["files"][0]
    assert report.settings["seeds"] is None
    assert list(result["rougeL_per_seed"]) == ["greedy"] and result["rougeL_std"] == 0.0
    assert [g["seed"] for g in report.generations] == [None] * len(RECORDS)


def test_eval_command_two_models(tmp_path, model_dirs, data_files):
    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "eval.json"
    args = ["--model", model_dirs[0], "--model", model_dirs[1], "--data", data_files[0], "--data", data_files[1],
            "--seeds", "10,20", "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu", "--json", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert [m["model"] for m in figures["models"]] == model_dirs
    rows = [json.loads(line) for line in (tmp_path / "eval.generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * (len(RECORDS) + 1)  # models x seeds x records of both files
    for m in figures["models"]:
        assert [f["n_records"] for f in m["files"]] == [len(RECORDS), 1]
        for f in m["files"]:
            per_seed = {s: sum(r["rougeL"] for r in rows if (r["model"], r["file"], r["seed"]) == (m["model"],
                        f["file"], int(s))) / f["n_records"] for s in ("10", "20")}
            assert f["rougeL_per_seed"] == pytest.approx(per_seed)
            assert f["rougeL_mean"] == pytest.approx(sum(per_seed.values()) / 2)
            assert f["rougeL_std"] == pytest.approx(abs(per_seed["10"] - per_seed["20"]) / 2)  # ddof=0
            assert f["ppl"] == pytest.approx(math.exp(f["nll"]))
        assert m["average"]["rougeL_mean"] == pytest.approx(sum(f["rougeL_mean"] for f in m["files"]) / 2)
    assert [m["name"] for m in figures["models"]] == [Path(d).name for d in model_dirs]  # short labels ...
    assert all(Path(d).name in result.stdout and d not in result.stdout for d in model_dirs)  # ... in the table
    assert "prompts.jsonl" in result.stdout and "avg" in result.stdout


def test_render_table_has_a_row_per_model_and_a_column_per_file(model_dirs, data_files):
    report = evaluate(model_dirs, data_files, seeds=(10,), max_new_tokens=4, device="cpu")
    table = render_table(report)
    assert table.row_count == 2
    assert [c.header for c in table.columns] == ["model", "prompts.jsonl", "alpaca.jsonl", "avg", "NLL", "ppl"]


def test_no_nll_skips_the_nll_pass_and_keeps_every_rouge_figure(tmp_path, model_dirs, data_files, monkeypatch):
    """--no-nll: the same generations and ROUGE-L (and paired ROUGE-L) as with the NLL pass, no NLL figure,
    no NLL column, and reference_nll never called."""
    import mta_cli.evaluation as evaluation

    options = dict(seeds=(10, 20), max_new_tokens=5, batch_size=2, device="cpu", baseline=model_dirs[0])
    full = evaluate(model_dirs, data_files[:1], **options)
    monkeypatch.setattr(evaluation, "reference_nll", lambda *a, **k: pytest.fail("NLL computed with nll=False"))
    with Progress(disable=True) as progress:
        skipped = evaluate(model_dirs, data_files[:1], nll=False, progress=progress, **options)
    assert [(t.completed, t.total) for t in progress.tasks] == [(2 * len(RECORDS), 2 * len(RECORDS))] * 2
    assert skipped.settings["nll"] is False and full.settings["nll"] is True
    assert [g["prediction"] for g in skipped.generations] == [g["prediction"] for g in full.generations]
    for a, b in zip(skipped.to_json()["models"], full.to_json()["models"]):
        assert a["files"][0]["rougeL_per_record"] == b["files"][0]["rougeL_per_record"]
        assert (a["files"][0]["nll"], a["files"][0]["ppl"], a["files"][0]["nll_per_record"]) == (None, None, None)
        assert (a["average"]["nll"], a["average"]["ppl"]) == (None, None)
    paired = skipped.models[1].paired["average"]
    assert set(paired) == {"rougeL_delta", "rougeL_ci95"}
    assert paired["rougeL_delta"] == full.models[1].paired["average"]["rougeL_delta"]
    assert [c.header for c in render_table(skipped).columns] == ["model", "prompts.jsonl", "avg", "ΔROUGE-L [95% CI]"]

    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["--model", model_dirs[0], "--data", data_files[0], "--seeds", "10",
                                      "--max-new-tokens", "3", "--device", "cpu", "--no-nll", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["models"][0]["average"]["nll"] is None and "NLL" not in result.stdout


def test_eval_command_reports_a_missing_data_file(tmp_path, model_dirs):
    app = typer.Typer()
    app.command()(eval_command)
    missing = str(tmp_path / "nope.jsonl")
    result = CliRunner().invoke(app, ["--model", model_dirs[0], "--data", missing])
    assert result.exit_code == 1
    assert missing in result.stderr and "not found" in result.stderr


def test_average_over_files_is_the_population_std_of_the_per_seed_means():
    """ModelResult.average: ROUGE-L per seed averaged over files, then mean and population std (ddof=0) over
    seeds; NLL the mean over files and ppl its exp. Checked with numpy on values where ddof 0 and 1 differ."""
    files = [FileResult(file=f"f{i}.jsonl", sha256="-", n_records=3, rougeL_mean=0.0, rougeL_std=0.0,
                        rougeL_per_seed=dict(zip(("10", "20", "30"), scores)), rougeL_per_record={}, nll=nll,
                        ppl=math.exp(nll), nll_per_record=[], wall_s=1.0)
             for i, (scores, nll) in enumerate([((10.0, 14.0, 30.0), 2.0), ((20.0, 8.0, 12.0), 3.5)])]
    average = ModelResult(model="m", load_s=0.0, files=files).average()
    per_seed = np.mean([[10.0, 14.0, 30.0], [20.0, 8.0, 12.0]], axis=0)
    assert average["rougeL_per_seed"] == pytest.approx(dict(zip(("10", "20", "30"), per_seed)), rel=1e-12)
    assert average["rougeL_mean"] == pytest.approx(per_seed.mean(), rel=1e-12)
    assert average["rougeL_std"] == pytest.approx(np.std(per_seed, ddof=0), rel=1e-12)
    assert abs(np.std(per_seed, ddof=1) - np.std(per_seed, ddof=0)) > 0.5
    assert average["nll"] == pytest.approx(2.75, rel=1e-12) and average["ppl"] == pytest.approx(np.exp(2.75), rel=1e-12)
    assert average["wall_s"] == 2.0


def test_evaluate_figures_equal_independent_computations(model_dirs, data_files, bl_tok):
    """Per file: ROUGE-L rescored here with rouge-score from the generations, its mean and population std
    over seeds, and the NLL from the model's own logits with ppl its exp; the average over files with numpy.
    16 new tokens: enough for the random model to score above 0 somewhere, so the std is not trivially 0."""
    report = evaluate(model_dirs[:1], data_files, seeds=(10, 20), max_new_tokens=16, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    result = report.models[0]
    per_file = []
    for f in result.files:
        rows = [g for g in report.generations if g["file"] == f.file]
        per_seed = [np.mean([100 * max(scorer.score(ref, g["prediction"])["rougeL"].fmeasure for ref in g["references"])
                             for g in rows if g["seed"] == seed]) for seed in (10, 20)]
        per_file.append(per_seed)
        assert f.rougeL_per_seed == pytest.approx({"10": per_seed[0], "20": per_seed[1]}, rel=1e-12, abs=1e-12)
        assert f.rougeL_mean == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert f.rougeL_std == pytest.approx(np.std(per_seed, ddof=0), abs=1e-12)
        nll = reference.response_nll(model, bl_tok, load_records(f.file, tokenizer=bl_tok).records)
        assert f.nll == pytest.approx(nll, rel=1e-5) and f.ppl == pytest.approx(np.exp(nll), rel=1e-5)
    assert np.std(per_file, axis=1).max() > 0
    average = report.to_json()["models"][0]["average"]
    seed_means = np.mean(per_file, axis=0)
    assert average["rougeL_mean"] == pytest.approx(seed_means.mean(), abs=1e-12)
    assert average["rougeL_std"] == pytest.approx(np.std(seed_means, ddof=0), abs=1e-12)
    assert average["nll"] == pytest.approx(np.mean([f.nll for f in result.files]), rel=1e-12)
