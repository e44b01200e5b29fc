"""Telecom pack: instruction and TeleQnA readers, answer extraction, option scoring, training, export, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from vision_ft.backbones import CausalLM
from vision_ft.data.instructions import read_conversations
from vision_ft.data.mcq import MCQItem, answer_text, read_mcq
from vision_ft.errors import DataError
from vision_ft.metrics.mcq import extract_choice, summarise
from vision_ft.tasks import CausalLMSFTTask

Q = {"question": "Which entity handles mobility?", "option 1": "UPF", "option 2": "AMF", "option 3": "PCF",
     "answer": "option 2: AMF", "explanation": "", "category": "Lexicon"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- readers --------------------------------------------------------------------------------------
def test_instruction_and_chat_records(tmp_path):
    f = _write(tmp_path / "a.jsonl", "\n".join([
        json.dumps({"instruction": "Define RRC.", "input": "In one line.", "response": "Radio resource control."}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
    ]))
    convs, skipped = read_conversations(f, system_prompt="Be brief.")
    assert not skipped and [s for _, s in convs] == [f"{f}:1", f"{f}:2"]
    assert convs[0][0] == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Define RRC.\n\nIn one line."},
                           {"role": "assistant", "content": "Radio resource control."}]


@pytest.mark.parametrize("line,message", [
    ("{not json", "a.jsonl:2: not valid JSON"),
    (json.dumps({"instruction": "x"}), "a.jsonl:2: missing or empty 'response'"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "a.jsonl:2: messages\\[0\\] has unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
     "a.jsonl:2: messages\\[1\\] is an empty assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "a.jsonl:2: no assistant turn"),
])
def test_bad_instruction_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"instruction": "a", "response": "b"})
    f = _write(tmp_path / "a.jsonl", good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_conversations(f)
    convs, skipped = read_conversations(f, on_bad="skip")
    assert len(convs) == 1 and len(skipped) == 1


def test_teleqna_layouts_and_the_encrypted_zip(tmp_path):
    pyzipper = pytest.importorskip("pyzipper")
    data = {"question 0": Q, "question 1": {**Q, "answer": "option 3: something else", "category": "Standards"}}
    items, _ = read_mcq(_write(tmp_path / "q.json", json.dumps(data)))
    assert [(i.id, i.answer, i.options) for i in items] == [("question 0", 1, ("UPF", "AMF", "PCF")),
                                                             ("question 1", 2, ("UPF", "AMF", "PCF"))]
    lines = _write(tmp_path / "q.jsonl", "\n".join(json.dumps({**Q, "id": f"n{i}"}) for i in range(3)))
    assert [i.id for i in read_mcq(lines)[0]] == ["n0", "n1", "n2"]
    archive = tmp_path / "TeleQnA.zip"
    with pyzipper.AESZipFile(archive, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(b"secret")
        zf.writestr("TeleQnA.txt", json.dumps(data))
    assert len(read_mcq(archive, password="secret")[0]) == 2
    with pytest.raises(DataError, match="cannot decrypt .*mcq_password"):
        read_mcq(archive, password="wrong")
    with pytest.raises(DataError, match="cannot decrypt"):
        read_mcq(archive)


@pytest.mark.parametrize("change,message", [
    ({"answer": "option 7: AMF"}, "names option 7, but the question has options 1..3"),
    ({"answer": "AMF"}, "'answer' must read 'option k: text'"),
    ({"question": " "}, "missing or empty 'question'"),
    ({"option 3": None, "option 4": "x"}, None),  # gap handled below
])
def test_bad_questions_are_clear_errors(tmp_path, change, message):
    record = {**Q, **change}
    if change.get("option 3", 1) is None:
        del record["option 3"]
        message = "numbered 1..N without gaps"
    f = _write(tmp_path / "q.json", json.dumps({"question 0": Q, "question 5": record}))
    with pytest.raises(DataError, match=message) as e:
        read_mcq(f)
    assert "'question 5'" in str(e.value)
    items, skipped = read_mcq(f, on_bad="skip")
    assert len(items) == 1 and len(skipped) == 1


@pytest.mark.parametrize("text,expected", [
    ("option 2: AMF", 1), ("The answer is Option 3.", 2), ("2", 1), ("(1) UPF", 0), ("amf", 1),
    ("I think it is the AMF here", 1), ("option 9", None), ("no idea", None), ("", None), ("UPF or AMF", None),
])
def test_answer_extraction(text, expected):
    assert extract_choice(text, ["UPF", "AMF", "PCF"]) == expected


def test_summary_counts_unparsed_as_wrong():
    recs = [{"pred": 1, "answer": 1, "category": "A b"}, {"pred": None, "answer": 0, "category": "A b"},
            {"pred": 2, "answer": 0, "category": "C"}, {"pred": 0, "answer": 0, "category": "C"}]
    s = summarise(recs)
    assert s["test/mcq_acc"] == 0.5 and s["test/mcq_unparsed"] == 1.0
    assert s["test/mcq_acc_a_b"] == 0.5 and s["test/mcq_acc_c"] == 0.5


# --- scoring on a tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task() -> CausalLMSFTTask:
    torch.manual_seed(0)
    t = CausalLMSFTTask(CausalLM("llama_test_tiny"), method="lora")
    for name, p in t.backbone.model.named_parameters():  # a non-zero update, as after training
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return t.eval()


ITEMS = [MCQItem(id="a", question="Which entity handles mobility?", options=("UPF", "AMF", "PCF"), answer=1),
         MCQItem(id="b", question="What does HARQ do?", options=("retransmission", "ciphering"), answer=0,
                 category="Standards")]


def test_loglik_scores_equal_hand_computed_log_probabilities(task):
    tok = task.tokenizer
    scores = task.option_scores(ITEMS)
    for item, row in zip(ITEMS, scores):
        prompt = task.question_ids(item)
        for k, (score, n) in enumerate(row):
            cont = tok(answer_text(item, k), add_special_tokens=False)["input_ids"]
            with torch.no_grad():  # one option alone, no padding: log p(cont_j | prompt, cont_<j)
                logp = torch.log_softmax(task.backbone.model(torch.tensor([prompt + cont])).logits[0].float(), -1)
            hand = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))
            assert n == len(cont)
            assert score == pytest.approx(hand, abs=1e-4)
    records = task.answer(ITEMS)
    assert [r["pred"] for r in records] == [max(range(len(r)), key=lambda k: r[k][0]) for r in scores]


def test_generate_mode_parses_and_reports(task):
    task.mcq_mode = "generate"
    try:
        records = task.answer(ITEMS)
    finally:
        task.mcq_mode = "loglik"
    for r, item in zip(records, ITEMS):
        assert r["pred"] == extract_choice(r["generated"], item.options)  # None (unparsed) counts as wrong


# --- train, test, export --------------------------------------------------------------------------
def _fit(tmp_path: Path, backbone: CausalLM, steps: int = 4, **method) -> tuple[CausalLMSFTTask, L.Trainer]:
    from domains.telecom import TelecomData

    L.seed_everything(0)
    spec = {"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 4, "alpha": 8, **method}}
    task = CausalLMSFTTask(backbone, method=spec, lr=5e-3)
    data = TelecomData(sample_dir=str(tmp_path / "sample"), max_length=256, batch_size=4, mcq_limit=6,
                       packing=True)
    trainer = L.Trainer(max_steps=steps, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run"),
                        enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=1,
                        enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    return task, trainer


def test_train_test_and_exports_load_with_transformers_and_peft_alone(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vision_ft.export import export_merged, export_peft

    task, trainer = _fit(tmp_path, CausalLM("qwen2_test_tiny"))
    run = task.run_dir
    meta = json.loads((run / "adapter.json").read_text())
    assert {"test/mcq_acc", "test/mcq_unparsed", "test/mcq_count"} <= set(meta["metrics"])
    assert meta["metrics"]["test/mcq_count"] == 6.0
    preds = [json.loads(x) for x in (run / "mcq_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(1 <= p["answer"] <= 5 for p in preds)
    task.eval()
    prompt = task.question_ids(ITEMS[0])
    x = torch.tensor([prompt])
    with torch.no_grad():
        want = task.backbone.model.generate(input_ids=x, max_new_tokens=12, do_sample=False, use_cache=True,
                                            pad_token_id=task.tokenizer.pad_token_id)
        logits = task.backbone(x)

    merged = export_merged(run, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    assert tok.chat_template == task.tokenizer.chat_template  # the template used in training travels
    with torch.no_grad():
        got = model.generate(input_ids=x, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(model(input_ids=x).logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, want)

    adapter = export_peft(run, tmp_path / "peft")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = CausalLM("qwen2_test_tiny")
    base.save_native(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, logits, rtol=1e-4, atol=1e-5)


def test_qlora_trains_the_adapter_on_nf4_weights_and_merges_into_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from vision_ft.export import export_merged

    lm = CausalLM("phi3_test_tiny", quantization="nf4")
    linear = lm.model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert type(linear).__name__ == "Linear4bit"
    packed = sum(p.numel() * p.element_size() for n, p in lm.model.named_parameters()
                 if "layers" in n and p.dtype == torch.uint8)
    fp32 = sum(p.numel() * 4 for n, p in CausalLM("phi3_test_tiny").model.named_parameters()
               if "layers" in n and p.ndim == 2)
    assert packed <= 0.3 * fp32  # 4-bit storage of the projection weights (measured: 0.125x)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}
    task, _ = _fit(tmp_path, lm, steps=2)
    trained = {n: p for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # the update moved off zero
    for n, p in task.backbone.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # quantised base untouched
    merged = export_merged(task.run_dir, tmp_path / "merged")
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg  # full precision: loads with transformers alone
    model = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert type(model.get_submodule("model.layers.0.self_attn.qkv_proj")).__name__ == "Linear"


def test_qlora_gradients_survive_an_eval_pass():
    """bitsandbytes' CPU kernel (repacked at the first eval forward) has no backward; the backbone keeps the
    differentiable path, so gradients after validation equal those of a model never evaluated."""
    pytest.importorskip("bitsandbytes")
    from vision_ft.methods import build_method

    grads = []
    for evaluate in (False, True):
        lm = CausalLM("qwen2_test_tiny", quantization="nf4")
        torch.manual_seed(0)
        method = build_method({"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2}})
        method.apply(lm)
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        x = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
        if evaluate:
            lm.eval()
            with torch.no_grad():
                lm(x)
        lm.train()
        lm(x).float().pow(2).mean().backward()
        grads.append(lm.model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_the_sample_is_deterministic_and_in_the_real_layouts(tmp_path):
    from domains.telecom import write_sample

    a, b = write_sample(tmp_path / "a"), write_sample(tmp_path / "b")
    for name in ("instructions.jsonl", "teleqna_sample.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    items, skipped = read_mcq(a / "teleqna_sample.json")
    assert not skipped and {len(i.options) for i in items} <= {2, 3, 4, 5}
    convs, _ = read_conversations(a / "instructions.jsonl")
    assert len(convs) > 100
    train_questions = {c[0][0]["content"] for c in convs}
    assert not any(f"{i.question}" in q for i in items for q in train_questions)  # test questions are not drills


def test_bench_lm_quick_reports_measured_ratios(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from vision_ft.bench.lm import cmd_lm

    assert cmd_lm(["--quick", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_lm.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"lora", "qlora", "full"}
    assert all(r["step_s"] > 0 and len(r["step_s_all"]) == 1 for r in rows.values())
    lora = result["goals"]["lora_step_vs_full"]
    assert lora["value"] == pytest.approx(rows["lora"]["step_s"] / rows["full"]["step_s"])
    # the fp32 bytes of the quantised layers, counted independently from the unquantised model
    plain = CausalLM("llama_test_tiny").model
    linears = [m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert rows["qlora"]["fp32_bytes"] == sum(m.weight.numel() * 4 for m in linears)
    assert rows["qlora"]["quantised_bytes"] < rows["qlora"]["fp32_bytes"] / 4  # 4 bits + scales < a quarter
    assert rows["full"]["trainable"] == sum(p.numel() for p in plain.parameters())
    assert rows["lora"]["trainable"] == 16 * sum(m.in_features + m.out_features for m in linears)  # r=16


def test_methods_command_lists_what_applies_to_a_language_model(capsys):
    from vision_ft.cli import main

    assert main(["methods", "--backbone", "qwen2_test_tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    plain = CausalLM("qwen2_test_tiny").model
    linears = [m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert rows["lora"]["trainable_params"] == 8 * sum(m.in_features + m.out_features for m in linears)
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in plain.parameters())
    assert "no patch-embedding stem" in rows["ssf"]["error"] and "text tower" in rows["coop"]["error"]
