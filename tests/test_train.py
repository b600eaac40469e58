"""train.py and eval.py end to end on the CPU: config errors, training steps, exact resume, DDP over gloo, eval
metrics against mask_metrics by hand, --image/--text, atomic checkpoints, a non-finite loss, and bench.py."""
import dataclasses
import json
import os
import re
import socket
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
import eval as evaluation
import metrics as scoring
import model
import qwen_inputs
import synthetic
import train
import build
import head as heads

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return synthetic.make_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=0, num_train=8, num_val=3, num_test=1,
                               size=112)


def tiny_config(model_dir, root, out_dir, **overrides):
    spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc", image_dir=os.path.join(root, "images"))
    raw = dict(model=model_dir, dtype="float32", head=dict(base=4, size=16), train_data=[dict(spec, split="train")],
               val_data=[dict(spec, split="val")], batch_size=2, max_steps=6, lr=3.0e-3, warmup=0.0, num_workers=0,
               log_every=1, eval_every=0, ckpt_every=2, vis_every=3, vis_samples=1, out_dir=str(out_dir), seed=1)
    raw.update(overrides)
    return build.config_from_dict(raw)


def head_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["grounder"]


# --------------------------------------------------------------------------------------------------- config

def test_config_parsing_and_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-4\nbatch_size: 3\nbetas: [0.8, 0.9]\nhead: {base: 8}\n")
    cfg = build.load_config(str(cfg_file), ["epochs=2", "resume=true", "out_dir=/tmp/x"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.batch_size == 3 and cfg.betas == (0.8, 0.9)
    assert cfg.epochs == 2.0 and cfg.resume is True and cfg.head == {"base": 8} and cfg.out_dir == "/tmp/x"
    with pytest.raises(SystemExit, match=r"unknown config keys \['batchsize'\]"):
        build.load_config(None, ["batchsize=4"])
    with pytest.raises(SystemExit, match="batch_size must be int, got 'four'"):
        build.load_config(None, ["batch_size=four"])
    with pytest.raises(SystemExit, match="lr must be float"):
        build.load_config(None, ["lr=fast"])
    with pytest.raises(SystemExit, match="resume must be bool"):
        build.load_config(None, ["resume=3"])
    with pytest.raises(SystemExit, match="not key=value"):
        build.load_config(None, ["resume"])
    for name in ("demo", "refcoco", "refcoco_7b"):  # the shipped configs parse
        assert build.load_config(os.path.join(os.path.dirname(build.__file__), "configs", f"{name}.yaml"))


def test_lr_schedule():
    cfg = build.Config(lr=1.0, warmup=0.1)
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01
    # F-LMM's 1e-4 at a global batch of 8, on 2 processes x 16 images: x sqrt(4); lr_batch 0 leaves lr alone
    assert train.peak_lr(build.Config(lr=1e-4, lr_batch=8, batch_size=16), 2) == pytest.approx(2e-4)
    assert train.peak_lr(build.Config(lr=1e-4, batch_size=16), 2) == 1e-4
    assert train.lr_at(50, 100, cfg, peak=2.0) == pytest.approx(2 * train.lr_at(50, 100, cfg))


# ------------------------------------------------------------------------------------------------- training

def test_training_lowers_the_loss_and_writes_everything(tiny_qwen, synthetic_root, tmp_path):
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, max_steps=12)
    metrics, head = train.train(cfg, torch.device("cpu"))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]]), log
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["config"]["max_steps"] == 12 and ckpt["grounder_kwargs"]["head"]["base"] == 4
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in ckpt["grounder"].items())
    assert set(metrics) == {"synthetic_val"} and 0 <= metrics["synthetic_val"]["cIoU"] <= 100
    assert json.load(open(tmp_path / "metrics.json")) == metrics
    assert os.listdir(tmp_path / "vis" / "synthetic_val") and os.listdir(tmp_path / "tb")
    assert (tmp_path / "config.yaml").exists()


class Interrupt(Exception):
    pass


def test_resume_is_bit_identical(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    """8 images, batch 2: 4 steps an epoch. Killed during step 4, resumed from the step-2 checkpoint (mid-epoch),
    run to step 6 (into epoch 2): the head must equal that of an uninterrupted 6-step run, bit for bit."""
    full = tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "full", vis_samples=0)
    train.train(full, torch.device("cpu"))

    cut = tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "cut", vis_samples=0)
    calls, loss = [0], heads.phrase_losses

    def dying_loss(out, batch):
        calls[0] += 1
        if calls[0] == 4:
            raise Interrupt
        return loss(out, batch)
    monkeypatch.setattr(heads, "phrase_losses", dying_loss)
    with pytest.raises(Interrupt):
        train.train(cut, torch.device("cpu"))
    monkeypatch.setattr(heads, "phrase_losses", loss)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 2
    train.train(build.config_from_dict(dict(vars(cut), resume=True)), torch.device("cpu"))
    a, b = head_state(tmp_path / "full" / "ckpt.pt"), head_state(tmp_path / "cut" / "ckpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3, logged before the kill, was dropped on resume and redone


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, vis_samples=0)
    calls, loss = [0], heads.phrase_losses

    def nan_loss(out, batch):
        calls[0] += 1
        terms = loss(out, batch)
        return dict(terms, bce=terms["bce"] * float("nan")) if calls[0] == 3 else terms
    monkeypatch.setattr(heads, "phrase_losses", nan_loss)
    with pytest.raises(RuntimeError, match=r"non-finite loss nan at step 2, samples \[\[.*\]\].*ckpt.pt"):
        train.train(cfg, torch.device("cpu"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1})

    def crash(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def _ddp_worker(rank, world, port, cfg_dict, out, fault=None):
    """One torchrun-like rank. fault="empty": rank 0's second micro-batch has no usable sample (skip_bad);
    fault="nan": rank 1's third loss is NaN. Errors are written to rank{r}.err instead of killing the test."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    if fault == "empty" and rank == 0:
        batches = train.micro_batches
        train.micro_batches = lambda loader, start: (dict(skipped=b["file_name"]) if i == 1 else b
                                                     for i, b in enumerate(batches(loader, start)))
    if fault == "nan" and rank == 1:
        calls, loss = [0], heads.phrase_losses

        def nan_loss(out, batch):
            calls[0] += 1
            terms = loss(out, batch)
            return dict(terms, bce=terms["bce"] * float("nan")) if calls[0] == 3 else terms
        heads.phrase_losses = nan_loss
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics, head = train.train(build.config_from_dict(cfg_dict), torch.device("cpu"), rank, world)
        torch.save(dict(head=head.state_dict(), metrics=metrics), os.path.join(out, f"rank{rank}.pt"))
    except RuntimeError as e:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(str(e))
    finally:
        torch.distributed.destroy_process_group()


def run_ddp(cfg, out, fault=None, timeout=240):
    """Two gloo ranks of train.train; fails (instead of hanging the suite) if they do not finish in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(out, exist_ok=True)
    context = mp.start_processes(_ddp_worker, args=(2, port, cfg, str(out), fault), nprocs=2, join=False,
                                 start_method="fork")  # the test process has the modules loaded: seconds faster
    deadline = time.time() + timeout
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"DDP ranks still running after {timeout} s (fault={fault}): one rank waits on the other")


def test_ddp_two_processes_keep_heads_identical(tiny_qwen, synthetic_root, tmp_path):
    cfg = vars(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "run", max_steps=4, vis_samples=0))
    run_ddp(cfg, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"])
    torch.manual_seed(1)  # the seed the run initialised its head with
    init = build.build_grounder(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["grounder_kwargs"]).state_dict()
    assert any(not torch.equal(init[k], r0["head"][k]) for k in init)  # it trained
    assert r0["metrics"] == r1["metrics"]  # eval results were gathered from both ranks
    n_val = sum(len(r["sentences"]) for r in data.load_refer(synthetic_root, "synthetic", "unc", "val"))
    assert r0["metrics"]["synthetic_val"]["n"] == n_val  # each sentence scored once, none twice


def test_ddp_ranks_never_wait_on_each_other(tiny_qwen, synthetic_root, tmp_path):
    # a micro-batch without a usable sample on one rank: it still joins the gradient all-reduce
    cfg = vars(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "empty", max_steps=3, vis_samples=0))
    run_ddp(cfg, tmp_path / "empty", fault="empty")
    r0, r1 = (torch.load(tmp_path / "empty" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"])
    # a non-finite loss on one rank: both stop at the same check, the bad rank names the step and samples
    cfg = vars(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "nan", max_steps=4, vis_samples=0))
    run_ddp(cfg, tmp_path / "nan", fault="nan")
    errors = [open(tmp_path / "nan" / f"rank{r}.err").read() for r in (0, 1)]
    assert "another rank stopped on a non-finite loss" in errors[0]
    assert re.search(r"non-finite loss nan at step 2, samples \[\[.*\]\]", errors[1])
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)["step"] == 2  # the last good one


# ----------------------------------------------------------------------------------------------------- eval

@pytest.fixture(scope="module")
def trained(tiny_qwen, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train.train(tiny_config(tiny_qwen[0], synthetic_root, out, vis_samples=0, max_steps=4), torch.device("cpu"))
    return str(out / "ckpt.pt")


def run_eval(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    evaluation.main()


def test_eval_equals_mask_metrics_by_hand(trained, tmp_path, monkeypatch):
    out = tmp_path / "metrics.json"
    run_eval(monkeypatch, "--ckpt", trained, "--out", str(out), "--batch_size", "3", "--vis", "1")
    result = json.load(open(out))["results"]["synthetic_val"]
    qwen, grounder, tokenizer, cfg = build.load_run(trained, torch.device("cpu"))
    assert cfg.pack_tokens > 0  # eval.py packed each image's sentences in one row
    dataset = build.build_dataset(dataclasses.replace(cfg, pack_tokens=0), tokenizer, cfg.val_data[0], train=False)
    preds, gts = [], []
    for i in range(len(dataset)):  # one sentence at a time, its own sequence, against the packed batched run above
        sample = dataset[i]
        with torch.no_grad():
            (logits,) = grounder(model.frozen_outputs(qwen, qwen_inputs.collate([sample])))["coarse"]
        h, w = sample["gt_masks"].shape[-2:]
        up = torch.nn.functional.interpolate(logits[None, None], size=(h, w), mode="bilinear", align_corners=False)
        preds.append(up[0, 0].numpy() > 0)
        gts.append(sample["gt_masks"][0].numpy())
    by_hand = evaluation.mask_metrics(preds, gts)
    assert by_hand["n"] == result["n"] == len(dataset)
    for k, v in by_hand.items():
        assert result[k] == pytest.approx(v, abs=1e-9), k
    # --vis writes beside the training run's overlays (vis/, none in this run), never over them
    assert os.listdir(os.path.join(os.path.dirname(trained), "eval_vis", "synthetic_val_standard"))
    assert not os.path.exists(os.path.join(os.path.dirname(trained), "vis"))


def test_baselines_are_trained_scored_and_reproduced(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, max_steps=2, vis_samples=0, baselines=True)
    train.main(cfg)
    table = json.load(open(tmp_path / "baselines.json"))
    assert set(table) == {f"synthetic_val ({k})" for k in ("ours", "constant phrase", "random object")}
    ablation = torch.load(tmp_path / "constant_phrase" / "ckpt.pt", weights_only=True)
    assert ablation["config"]["constant_phrase"] == "the object" and ablation["step"] == 2
    run_eval(monkeypatch, "--ckpt", str(tmp_path / "ckpt.pt"), "--baselines", "--out", str(tmp_path / "m.json"))
    results = json.load(open(tmp_path / "m.json"))["results"]
    assert results == table  # the same three rows, rebuilt from the two checkpoints


def test_mask_metrics_definitions():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    empty = np.zeros((4, 4), bool)
    m = scoring.mask_metrics([a, b, empty], [b, b, empty])
    assert m["cIoU"] == pytest.approx(100 * (4 + 8 + 0) / (12 + 8 + 0))
    assert m["mIoU"] == pytest.approx(100 * (4 / 12 + 1 + 1) / 3)  # empty on empty counts as IoU 1
    assert m["P@0.5"] == pytest.approx(200 / 3) and m["P@0.9"] == pytest.approx(200 / 3) and m["n"] == 3
    assert scoring.average_recall([1.0, 1.0]) == pytest.approx(100, abs=1e-3)
    # the benchmark's left Riemann sum over t = 0, 1e-5, ...: IoU 0.5 is recalled for 50,001 thresholds
    assert scoring.average_recall([0.5]) == pytest.approx(50.001, abs=1e-6)
    assert scoring.average_recall([0.0, 1.0]) == pytest.approx(50, abs=1e-3)


def test_predict_one_image_writes_png(trained, tmp_path, monkeypatch):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif)
    run_eval(monkeypatch, "--ckpt", trained, "--image", str(path), "--text", "the red circle")
    out = os.path.join(os.path.dirname(trained), "photo_the_red_circle.png")
    assert Image.open(out).size == (60, 90 + 14)  # EXIF applied: the portrait the viewer shows, under a caption
    run_eval(monkeypatch, "--ckpt", trained, "--image", str(path), "--text", "zebra", "--out", str(tmp_path / "z.png"))
    assert Image.open(tmp_path / "z.png").size == (60, 104) and os.path.exists(out)  # --out honoured, nothing lost
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit, match="broken.jpg: cannot read it as an image"):
        run_eval(monkeypatch, "--ckpt", trained, "--image", str(broken), "--text", "zebra")
    for text in ([], ["--text", ""], ["--text", "   "]):
        with pytest.raises(SystemExit, match="needs a non-empty --text"):
            run_eval(monkeypatch, "--ckpt", trained, "--image", str(path), *text)


# ---------------------------------------------------------------------------------------------------- bench

def test_bench_runs(tmp_path, monkeypatch):
    import bench
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick", "--image_size", "112x84", "--workers", "0",
                                      "--sections", "all", "--out", str(out)])
    extractions, extract_all = [], bench.cache.extract_all

    def recorded(cfg, **kw):
        extractions.append((cfg.pack_tokens, cfg.cache_dir, len(os.listdir(cfg.cache_dir)) if
                            os.path.isdir(cfg.cache_dir) else 0))
        return extract_all(cfg, **kw)
    monkeypatch.setattr(bench.cache, "extract_all", recorded)
    bench.main()
    # the packing section extracts packed and unpacked alternately, each time into a new, empty cache_dir (else a
    # complete cache is skipped and the extraction measures nothing); the cache section extracts too
    extractions = [e for e in extractions if os.path.basename(e[1]).startswith(("cache_demo_", "cache_7image_"))]
    assert [p for p, _, _ in extractions] == [2048, 0] * 4  # 2 each, at ~11 and at <= 7 sentences per image
    assert len({d for _, d, _ in extractions}) == 8 and all(n == 0 for _, _, n in extractions)
    res = json.load(open(out))
    for section, key in (("patchify", "speedup_vs_hf"), ("forward", "capture_time_vs_floor"),
                         ("forward", "capture_speedup_vs_flmm"), ("train", "step_time_vs_floor"),
                         ("train", "samples_per_s"), ("loader", "samples_per_s"), ("refiner", "refiner_step_vs_unet"),
                         ("cache", "cached_vs_online")):
        assert 0 < res[section][key] < float("inf"), (section, key)
    assert set(res["forward"]) >= {"floor", "ours", "ours_no_capture", "flmm", "seq_len", "image_tokens"}
    for label in ("demo", "7/image"):  # packed vs one sequence per sentence, the same sentences
        packed, alone = res["packing"][label]["packed"], res["packing"][label]["one_per_sentence"]
        assert packed["sentences"] == alone["sentences"] > 0
        trains = ("train", "train_all") if label == "demo" else ("train_all",)  # one per object: the same draw
        assert all(0 < res["packing"][label][f"{what}_speedup"] < float("inf") for what in ("extract", "eval") + trains)
        for what in trains:  # the frozen forwards' part of each training epoch, timed inside it
            assert packed[f"{what}_sentences"] == alone[f"{what}_sentences"] > 0  # sentences/s of the same sentences
            assert 0 < packed[f"{what}_frozen_share"] < 1 and 0 < alone[f"{what}_frozen_share"] < 1
            assert 0 < res["packing"][label][f"{what}_frozen_speedup"] < float("inf")


def test_bench_interleaved_alternates():
    """Packed and unpacked epochs alternate (A B A B), so that drift on a shared machine hits both alike; each gets
    its own median time and median part."""
    import bench
    calls = []

    def fn(name, part):
        def call():
            calls.append(name)
            time.sleep(0.002 if name == "a" else 0.02)
            return part
        return call
    out = bench.interleaved({"a": fn("a", 1.0), "b": fn("b", 2.0)}, torch.device("cpu"), repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up, 3 timed pairs
    assert out["a"][1] == 1.0 and out["b"][1] == 2.0
    assert 0.002 <= out["a"][0] < out["b"][0]


def test_bench_packing_on_a_given_model(tiny_qwen, tmp_path, monkeypatch):
    """`bench.py --model <checkpoint> --sections packing` (the GPU measurement: 7 sentences per image on random
    images) times one packed row per image against 7 sequences, the packed one with the prefix once."""
    import bench
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", tiny_qwen[0], "--quick", "--image_size", "112x84",
                                      "--sections", "packing", "--out", str(out)])
    rows, frozen_outputs = [], bench.model.frozen_outputs

    def recorded(qwen, batch, **kw):
        rows.append(len(batch["input_ids"]))
        return frozen_outputs(qwen, batch, **kw)
    monkeypatch.setattr(bench.model, "frozen_outputs", recorded)
    bench.main()
    r = json.load(open(out))["packing"]["batch_1"]
    packed, alone = r["packed"], r["one_per_sentence"]
    assert (packed["sequences"], alone["sequences"]) == (1, 7) and packed["tokens"] < alone["tokens"] / 3
    assert rows == [1, 7] * 3  # each forward ran its own batch, alternately: 2 warm-up pairs, 1 timed (--quick)
    assert 0 < r["speedup"] < float("inf")


def test_grad_accum_equals_one_batch_of_twice_the_size(tiny_qwen, synthetic_root, tmp_path):
    """The loss of a step is the sum over its phrases divided by the step's phrase count, so 2 x 2 images equal
    4 images in one micro-batch (the same samples in the same steps; equal up to float summation order)."""
    runs = {}
    for name, bs, accum in (("one", 4, 1), ("accum", 2, 2)):
        cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path / name, batch_size=bs, grad_accum=accum, max_steps=4,
                          vis_samples=0, vis_every=0)
        runs[name] = train.train(cfg, torch.device("cpu"))[1].state_dict()
    torch.manual_seed(1)
    init = train.build.build_grounder(torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["grounder_kwargs"])
    assert any(not torch.allclose(init.state_dict()[k], runs["one"][k]) for k in runs["one"])  # it trained
    for k in runs["one"]:
        assert torch.allclose(runs["one"][k], runs["accum"][k], atol=2e-5), k


def test_summarize_grefcoco_and_png_on_known_rows():
    def row(inter, union, area, **flags):
        return (inter, union, dict(dict(no_target=False, isthing=True, plural=False, supervised=True), **flags), area)
    # gRefCOCO: three no-target expressions (two predicted empty: right; one not: wrong); of the three with a
    # target, one is predicted empty (wrong)
    rows = [row(0, 0, 0, no_target=True), row(0, 0, 0, no_target=True), row(0, 5, 5, no_target=True),
            row(4, 8, 6), row(2, 4, 3), row(0, 3, 0)]
    m = scoring.summarize(rows, "grefcoco")
    assert m["N-acc"] == pytest.approx(200 / 3) and m["T-acc"] == pytest.approx(200 / 3)
    assert m["cIoU"] == pytest.approx(100 * 6 / 20) and m["mIoU"] == pytest.approx(100 * (1 + 1 + 0 + 0.5 + 0.5) / 6)
    # PNG: things are recalled perfectly, stuff never; plural rows are the stuff ones; unsupervised rows do not count
    rows = [row(10, 10, 10), row(10, 10, 10), row(0, 10, 5, isthing=False, plural=True),
            row(5, 10, 5, isthing=False, plural=True, supervised=False)]
    m = scoring.summarize(rows, "png")
    # (the benchmark's sum counts IoU 0 as recalled at threshold 0: 0.001 for a miss, 99.999 for a hit)
    assert m["n"] == 3 and m["AR_things"] == pytest.approx(100, abs=2e-3) and m["AR_stuff"] == pytest.approx(0, abs=2e-3)
    assert m["AR_singular"] == pytest.approx(100, abs=2e-3) and m["AR_plural"] == pytest.approx(0, abs=2e-3)
    assert m["AR"] == pytest.approx(200 / 3, abs=2e-3)


# --------------------------------------------------------------------------------------------- loud errors

def test_run_errors_are_loud(tiny_qwen, synthetic_root, tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(SystemExit, match="resume=true but .*ckpt.pt does not exist"):
        train.train(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "none", resume=True), cpu)
    with pytest.raises(SystemExit, match="resume must be bool, got 'yes'"):
        build.load_config(None, ["resume=yes"])
    with pytest.raises(SystemExit, match=r"dtype must be one of \('bfloat16', 'float16', 'float32'\), got 'bf16'"):
        build.load_config(None, ["dtype=bf16"])
    # 8 training images, batch 16: no full step, with or without max_steps
    with pytest.raises(SystemExit, match="8 training images make no full step of batch_size 16"):
        train.train(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "small", batch_size=16, max_steps=3), cpu)
    # missing data: named before any model loads (the model path does not exist either, and is never reached)
    missing = tiny_config("no/such/model", str(tmp_path / "nodata"), tmp_path / "missing")
    with pytest.raises(SystemExit, match=r"data not found.*\n  synthetic_train: .*nodata/synthetic/refs\(unc\).p"):
        train.train(missing, cpu)
    # a checkpoint written by 2 processes cannot be resumed by 1 (the data order depends on it)
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "run", max_steps=2, vis_samples=0)
    train.train(cfg, cpu)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    train.save_checkpoint(str(tmp_path / "run" / "ckpt.pt"), dict(ckpt, world=2))
    with pytest.raises(SystemExit, match="written by 2 process.*this run has 1"):
        train.train(build.config_from_dict(dict(vars(cfg), resume=True)), cpu)
    # a fresh run in an old out_dir starts a fresh log
    train.train(cfg, cpu)
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]


def test_eval_refuses_what_is_not_a_checkpoint(trained, tmp_path, monkeypatch):
    yaml_file = tmp_path / "demo.yaml"
    yaml_file.write_text("model: tiny\n")
    no_config = tmp_path / "weights.pt"
    torch.save({"head": {}}, no_config)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(trained, "rb").read()[:5000])
    for path, message in ((yaml_file, "not a train.py checkpoint \\(not a torch zip file"),
                          (no_config, r"not a train.py checkpoint \(needs keys"),
                          (truncated, r"truncated: a torch zip file without its end"),
                          (tmp_path / "nothing.pt", "no such checkpoint")):
        with pytest.raises(SystemExit, match=message):
            run_eval(monkeypatch, "--ckpt", str(path))


def test_the_grounded_head_beats_the_same_head_without_language(tmp_path):
    """The end-to-end claim of the demo, small: on synthetic scenes where only the words tell the objects apart, the
    head trained on the real expressions must beat the same head trained with every expression replaced by "the
    object" (which can only learn saliency). Frozen outputs are extracted once (cache.py) and reused for 20 epochs.
    Breaking the phrase capture, the maps' normalisation or the vision features' routing loses this margin."""
    import cache
    root = str(tmp_path / "synthetic")
    spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc", image_dir=os.path.join(root, "images"))
    base = dict(model="tiny", tiny_model=dict(seed=0, hidden=128, layers=4, heads=16, kv_heads=16, vision_hidden=64,
                                              vision_depth=2),
                synthetic=dict(root=root, seed=0, num_train=60, num_val=15, num_test=1, size=224), dtype="float32",
                head=dict(base=16, size=16), vision_features=True, layout="sentence", train_data=[dict(spec, split="train")],
                val_data=[dict(spec, split="val")], batch_size=4, epochs=20.0, lr=1.0e-3, num_workers=0, log_every=50,
                eval_every=0, ckpt_every=10000, vis_every=0, vis_samples=0, seed=0)
    synthetic.make_synthetic(**base["synthetic"])
    cIoU = {}
    for name, phrase in (("words", ""), ("constant", "the object")):
        cfg = build.config_from_dict(dict(base, constant_phrase=phrase, out_dir=str(tmp_path / name),
                                          cache_dir=str(tmp_path / f"cache_{name}")))
        cache.extract_all(cfg)
        cIoU[name] = train.train(cfg, torch.device("cpu"))[0]["synthetic_val"]["cIoU"]
    assert cIoU["words"] > cIoU["constant"] + 5, cIoU


def test_refiner_run_reports_refined_and_coarse_masks(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    """With a refiner the end-of-run table holds the refined masks and the U-Net's own, and eval.py scores the same
    two from the checkpoint (default: refined; --coarse: the U-Net's)."""
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, max_steps=3, vis_samples=0, vis_every=0,
                      refiner=dict(sam="tiny"), synthetic=dict(root=str(tmp_path / "sam")))
    build.prepare_sam(cfg)  # writes the tiny SAM (start_job does it in the scripts)
    metrics, _ = train.train(cfg, torch.device("cpu"))
    assert set(metrics) == {"synthetic_val", "synthetic_val (U-Net only)"}
    assert metrics["synthetic_val"] != metrics["synthetic_val (U-Net only)"]
    for flag, key in (([], "synthetic_val"), (["--coarse"], "synthetic_val (U-Net only)")):
        run_eval(monkeypatch, "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "m.json"), *flag)
        assert json.load(open(tmp_path / "m.json"))["results"] == {key: pytest.approx(metrics[key])}, key


# ------------------------------------------------------------------------------- tests aimed at one breakage each

def test_precision_at_t_counts_an_iou_of_exactly_t():
    """IoUs of exactly 0.5, 0.6, 0.7, 0.8, 0.9 (I/U = 1/2, 3/5, 7/10, 4/5, 9/10: the division rounds to the same
    double as the literal): P@t = 100 * #(IoU >= t) / n, the tie a hit."""
    m = scoring._metrics([1, 3, 7, 4, 9], [2, 5, 10, 5, 10])
    assert [m[f"P@{t}"] for t in scoring.THRESHOLDS] == pytest.approx([100, 80, 60, 40, 20])


def test_predicted_kinds_are_the_refined_and_the_coarse_logits(tmp_path):
    """eval's "final" masks are the refiner's and "coarse" the U-Net's, checked against the grounder's own outputs
    (a swap inside eval changes the training report and eval.py alike, so only an outside reference sees it)."""
    import refiner
    torch.manual_seed(0)
    sam = refiner.build_tiny_sam(str(tmp_path / "sam"))
    grounder = build.build_grounder(dict(head=dict(in_channels=4, base=4, size=8, token_px=28),
                                         refiner=dict(sam=sam, hidden_size=16, text_layers=2)), "cpu").eval()
    g = torch.Generator().manual_seed(0)
    frozen = dict(maps=[torch.rand(4, 3, 4, generator=g), torch.rand(4, 3, 4, generator=g)], phrase_image=[0, 0],
                  vision=None, hidden=[torch.randn(2, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)],
                  sam_embeddings=torch.randn(1, 64, 16, 16, generator=g), sam_sizes=[(192, 256)])
    out = grounder(frozen)
    sizes = [(60, 80)]
    preds = evaluation.predict_kinds(None, grounder, dict(frozen=frozen), sizes, ("final", "coarse"))
    for kind, key in (("final", "refined"), ("coarse", "coarse")):
        want = [torch.nn.functional.interpolate(x[None, None], size=sizes[0], mode="bilinear")[0, 0] > 0
                for x in out[key]]
        assert all(torch.equal(p, w) for p, w in zip(preds[kind], want, strict=True)), kind
    assert any(not torch.equal(a, b) for a, b in zip(preds["final"], preds["coarse"]))  # the test can tell them apart


def test_gradient_clipping_bounds_the_step(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    """With plain SGD (Adam divides the gradient's size away) one step moves the weights by lr * the clipped
    gradient: at most lr * grad_clip in norm, though the raw gradient is far larger."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, max_steps=1, lr=1.0, grad_clip=1e-3, vis_samples=0,
                      vis_every=0)
    trained = train.train(cfg, torch.device("cpu"))[1].state_dict()
    torch.manual_seed(cfg.seed)
    init = build.build_grounder(torch.load(tmp_path / "ckpt.pt", weights_only=True)["grounder_kwargs"]).state_dict()
    moved = torch.cat([(trained[k] - init[k]).flatten() for k in init]).norm()
    (logged,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert logged["grad_norm"] > 100 * cfg.grad_clip  # the raw norm, before clipping
    assert 0 < moved <= cfg.lr * cfg.grad_clip * (1 + 1e-4), float(moved)


def test_a_configs_min_pixels_reaches_the_patchifier(tiny_qwen, synthetic_root):
    """min_pixels=448*448 upscales the 112-px synthetic images to a 32x32 patch grid (the checkpoint's own minimum
    leaves them at 8x8); max_pixels below their size shrinks them."""
    grids = {}
    for name, over in (("default", {}), ("min", dict(min_pixels=448 * 448)), ("max", dict(max_pixels=56 * 56))):
        cfg = tiny_config(tiny_qwen[0], synthetic_root, "unused", **over)
        ds = build.build_dataset(cfg, tiny_qwen[2], cfg.val_data[0], train=False)
        grids[name] = ds[0][0]["image_grid_thw"][0].tolist()  # an image's packed rows: the first
    assert grids == dict(default=[1, 8, 8], min=[1, 32, 32], max=[1, 4, 4])


def _count_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:  # rank 0: one sequence of one phrase; rank 1: two sequences of one phrase each
        micro = [dict(supervised=[[True]], phrases=[["a"]])] if rank == 0 else \
            [dict(supervised=[[True]], phrases=[["b"]]), dict(supervised=[[True], [False]], phrases=[["c"], ["d"]])]
        counts = train.step_counts(micro, torch.device("cpu"))
        torch.save({k: float(v) for k, v in counts.items()}, os.path.join(out, f"counts{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_step_counts_are_summed_over_the_ranks(tmp_path):
    """Rank 0 holds 1 supervised phrase in 1 sequence, rank 1 holds 2 (and an unsupervised one) in 3 sequences: both
    divide by the step's 3 phrases and 4 sequences, or the ranks' gradients would be weighted unequally."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_count_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")  # seconds faster
    for r in (0, 1):
        assert torch.load(tmp_path / f"counts{r}.pt") == dict(phrase=3.0, sequence=4.0), r


# ------------------------------------------------------------------------------- what a new user meets, by command

def test_config_errors_name_the_block_and_the_culprit(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 3\n")
    for override, message in (("head={base: 8, sise: 16}", r"head takes the keys \['base', 'size'\]; unknown: \['sise'\]"),
                              ("tiny_model={layer: 2}", r"tiny_model takes the keys .*'layers'.*unknown: \['layer'\]"),
                              ("refiner={sam: tiny, layers: 2}", r"refiner takes the keys \['sam', 'text_layers', 'box', 'detach_mask'\]"),
                              ("refiner={text_layers: 2}", "refiner needs sam"),
                              ("selector={width: 8, depth: 2}", r"selector takes the keys \['layers', 'width'\]"),
                              ("synthetic={num_trian: 3}", r"synthetic takes the keys .*unknown: \['num_trian'\]"),
                              ("batchsize=4", r"^command line \['batchsize=4'\]: unknown config keys")):
        with pytest.raises(SystemExit, match=message):
            build.load_config(str(cfg_file), [override])
    cfg_file.write_text("batchsize: 3\n")  # the file's own mistake is the file's
    with pytest.raises(SystemExit, match=f"^{re.escape(str(cfg_file))}: unknown config keys"):
        build.load_config(str(cfg_file), ["lr=0.1"])
    assert build.load_config(None, ["cache_dir="]).cache_dir == ""  # online training, spelt the obvious way
    with pytest.raises(SystemExit, match=r"command line: 'head=\{base:' is not a YAML value"):
        build.load_config(None, ["head={base:", "8}"])  # what an unquoted head={base: 8} reaches us as


def test_a_missing_model_is_one_line(tmp_path):
    for name in ("/nonexistent", "./no/such", "not-an-id"):
        with pytest.raises(SystemExit, match=f"model={re.escape(name)}: no such directory"):
            build.build_qwen(build.Config(model=name), torch.device("cpu"))
    with pytest.raises(SystemExit, match="model=nobody/nothing: cannot load it"):  # offline in the tests
        build.build_qwen(build.Config(model="nobody/nothing"), torch.device("cpu"))


def test_threads_follow_the_launchers_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    build.start_job(build.Config(threads=before + 1))
    assert torch.get_num_threads() == before
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        build.start_job(build.Config(threads=before + 1))
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_eval_flags_that_cannot_apply_say_so(trained, monkeypatch):
    with pytest.raises(SystemExit, match=r"--split \['synthetic_trian'\]: not among the run's val_data splits "
                                         r"\['synthetic_val'\]"):
        run_eval(monkeypatch, "--ckpt", trained, "--split", "synthetic_val", "synthetic_trian")
    with pytest.raises(SystemExit, match="--image grounds one picture: --split"):
        run_eval(monkeypatch, "--ckpt", trained, "--image", "x.png", "--text", "a", "--split", "synthetic_val")
    with pytest.raises(SystemExit, match="--coarse: .* has no refiner"):
        run_eval(monkeypatch, "--ckpt", trained, "--coarse")
    with pytest.raises(SystemExit, match="--cache: .* was trained online"):
        run_eval(monkeypatch, "--ckpt", trained, "--cache")


def test_an_empty_micro_batch_joins_the_sharded_forward(tiny_qwen, synthetic_root, tmp_path):
    """shard: true (FSDP2 over the frozen VLM): a rank whose micro-batch held no usable sample still runs the VLM's
    forward with the other rank (on its last good batch), or both wait forever in the all-gather."""
    cfg = vars(tiny_config(tiny_qwen[0], synthetic_root, tmp_path / "run", max_steps=3, vis_samples=0, vis_every=0,
                           shard=True))
    run_ddp(cfg, tmp_path, fault="empty", timeout=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"])
