"""cache.py: the cached frozen outputs equal the online ones (within float16), training from the cache equals online
training with layout=sentence, a cache made for another config is refused, a killed extraction resumes, and a cache
made by 2 processes equals one made by 1."""
import dataclasses
import filecmp
import glob
import json
import os
import re
import shutil
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import batching
import build
import cache
import cached
import head as heads
import model
import synthetic
import train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SHARD = 8  # sequences per shard: the 93 training sentences make 12 shards, cut into batches of 3, 3, 2
FP16 = dict(rtol=2 ** -11 * 1.01, atol=1e-7)  # float16 rounding (relative 2^-11) + float32 noise (<= 3e-8 seen)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return synthetic.make_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=0, num_train=8, num_val=3,
                                    num_test=1, size=112)


def cache_config(model_dir, root, out_dir, **overrides):
    spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc",
                image_dir=os.path.join(root, "images"))
    raw = dict(model=model_dir, dtype="float32", head=dict(base=4, size=16), vision_features=True, layout="sentence",
               train_data=[dict(spec, split="train")], val_data=[dict(spec, split="val")], batch_size=3, max_steps=6,
               lr=3.0e-3, warmup=0.0, num_workers=0, log_every=1, eval_every=0, ckpt_every=3, vis_every=0,
               vis_samples=1, out_dir=str(out_dir), seed=1, cache_dir=str(out_dir / "cache"))
    raw.update(overrides)
    return build.config_from_dict(raw)


@pytest.fixture(scope="module")
def extracted(tiny_qwen, synthetic_root, tmp_path_factory):
    """A config whose cache_dir holds the train and val splits, extracted by one process."""
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path_factory.mktemp("extracted"))
    cache.extract_all(cfg, shard_size=SHARD)
    return cfg


def cache_files(folder):
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**"), recursive=True)
                  if os.path.isfile(p))


def assert_same_files(a, b):
    assert cache_files(a) == cache_files(b)
    for name in cache_files(a):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


# ------------------------------------------------------------------------------------------------ read back

def per_phrase(batch, key):
    """A batch's per-sample value of `key` (a list per sample, or one value) -> one entry per phrase."""
    return [x for xs, ids in zip(batch[key], batch["ids"], strict=True)
            for x in (xs if isinstance(xs, list) or torch.is_tensor(xs) else [xs] * len(ids))]


def test_cached_batches_equal_online_batches(tiny_qwen, extracted):
    """Train (two epochs, and a resumed epoch) and val batches: the same phrases in the same order, masks and flags
    as the online loaders (training packs an image's sentences in one row, the cache reads one sequence per
    sentence), and maps / vision features equal to what frozen_outputs computes online, within float16."""
    _, qwen, tokenizer = tiny_qwen
    cfg = extracted
    assert cfg.pack_tokens > 0
    pairs = [(build.build_train_loader(cfg, tokenizer), cached.build_train_loader(cfg), epoch, skip)
             for epoch, skip in ((0, 0), (1, 0), (1, 1))]
    unpacked = dataclasses.replace(cfg, pack_tokens=0)  # the standard protocol's order: one sequence per sentence
    pairs += [(online, from_cache, None, 0) for (online, _), (from_cache, _) in
              zip(build.build_val_loaders(unpacked, tokenizer, cfg.val_data).values(),
                  cached.build_val_loaders(cfg, cfg.val_data).values())]
    drawn, packed = {}, False
    for online, from_cache, epoch, skip in pairs:
        if epoch is not None:
            batching.set_epoch(online, epoch, skip)
            batching.set_epoch(from_cache, epoch, skip)
        n = 0
        for a, b in zip(online, from_cache, strict=True):
            packed |= "segment_ids" in a
            for key in ("ids", "phrases", "image_id", "file_name", "supervised", "no_target", "isthing", "plural",
                        "masks", "gt_masks"):
                x, y = per_phrase(a, key), per_phrase(b, key)
                assert len(x) == len(y) and all(torch.equal(u, v) if torch.is_tensor(u) else u == v
                                                for u, v in zip(x, y)), key
            out = model.frozen_outputs(qwen, a, vision=True)
            frozen = b["frozen"]
            assert frozen["phrase_image"] == list(range(len(b["ids"]))) and frozen["hidden"] is None
            for x, y in zip(out["maps"], frozen["maps"], strict=True):  # float16 deviations from each channel's mean
                deviation = (x - x.mean((-2, -1), keepdim=True)).abs()
                assert y.dtype == torch.float32 and y.shape == x.shape
                assert ((y - x).abs() <= FP16["rtol"] * deviation + FP16["atol"]).all(), (y - x).abs().max()
            for i, j in zip(out["phrase_image"], frozen["phrase_image"], strict=True):  # each phrase's image's
                x, y = out["vision"][i], frozen["vision"][j]
                assert y.dtype == torch.float16 and torch.allclose(y.float(), x, **FP16), (y.float() - x).abs().max()
            drawn.setdefault((epoch, skip), []).extend(per_phrase(a, "ids"))
            n += 1
        assert n == len(online) > 0
    assert packed  # the online training batches were packed
    assert drawn[0, 0] != drawn[1, 0]  # another epoch, other sentences and order: the draw follows the epoch
    assert drawn[1, 1] == drawn[1, 0][-len(drawn[1, 1]):]  # resuming a batch into the epoch continues it


# ----------------------------------------------------------------------------------------------- training

def test_training_from_cache_equals_online_training(tiny_qwen, extracted, tmp_path, monkeypatch):
    """Same seed, layout=sentence, 6 steps of 3 of the 8 images (3 epochs), no VLM loaded. Stored in
    float32, the cache trains the online run's head to float32 noise: the same samples, sentence draws, order and
    outputs. Stored in float16 (as it is), every step's loss agrees within float16 rounding, and so do the scores;
    the weights do not to that precision: the head's ReLU and max-pool kinks let a 1e-4 rounding move some gradients
    by ~1%, and Adam's first steps (sign-like) amplify that to 2-30% of the update, whatever the perturbation."""
    online = dataclasses.replace(extracted, cache_dir="", out_dir=str(tmp_path / "online"))
    metrics_online, head_online = train.train(online, torch.device("cpu"))
    monkeypatch.setattr(cache, "STORAGE", torch.float32)
    exact = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache32"), out_dir=str(tmp_path / "exact"),
                                val_data=[], vis_samples=0)
    cache.extract_all(exact, shard_size=SHARD)
    monkeypatch.setattr(build, "build_qwen", lambda *a: pytest.fail("the VLM loaded while training from the cache"))
    _, head_exact = train.train(exact, torch.device("cpu"))
    monkeypatch.setattr(cache, "STORAGE", torch.float16)
    from_cache_cfg = dataclasses.replace(extracted, out_dir=str(tmp_path / "cached"))
    metrics_cached, _ = train.train(from_cache_cfg, torch.device("cpu"))

    a, b = head_online.state_dict(), head_exact.state_dict()
    torch.manual_seed(from_cache_cfg.seed)
    init = build.build_grounder(torch.load(tmp_path / "cached" / "ckpt.pt", weights_only=True)["grounder_kwargs"])
    assert max((a[k] - init.state_dict()[k]).abs().max() for k in a) > 1e-2  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("online", "cached")]
    assert logs[1][0]["loss"] == pytest.approx(logs[0][0]["loss"], rel=1e-5)
    assert [x["loss"] for x in logs[1]] == pytest.approx([x["loss"] for x in logs[0]], rel=2e-3)
    for split, m in metrics_online.items():
        assert metrics_cached[split]["n"] == m["n"] and metrics_cached[split]["cIoU"] == pytest.approx(m["cIoU"], abs=1)
    assert os.listdir(tmp_path / "cached" / "vis")  # the overlays are drawn from cached batches too


@pytest.mark.parametrize("sam", ["tiny", "tiny_sam_hq", "tiny_sam2"])
def test_the_refiners_inputs_are_cached_too(tiny_qwen, synthetic_root, tmp_path, sam):
    """With the SAM refiner, build.extract also returns the phrases' hidden states, SAM's image encoder outputs (one
    (B, ...) tensor each: embeddings, SAM-HQ's intermediate map, SAM 2's high-resolution maps) and sam_sizes: stored
    and read back as they are, and a cached run trains the refiner."""
    _, qwen, tokenizer = tiny_qwen
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=dict(sam=sam, text_layers=2),
                       synthetic=dict(root=synthetic_root), max_steps=2, vis_samples=0)
    build.prepare_sam(cfg)  # writes the tiny SAM (start_job does it in the scripts)
    cache.extract_all(cfg, shard_size=SHARD)
    grounder = build.build_grounder(build.grounder_kwargs(cfg, qwen.config))
    unpacked = dataclasses.replace(cfg, pack_tokens=0)  # extracted packed, compared with one sequence per sentence
    online = next(iter(build.build_train_loader(unpacked, tokenizer, build.sam_settings(grounder))))
    read = next(iter(cached.build_train_loader(cfg)))
    expect, frozen = build.extract(qwen, grounder, online), read["frozen"]
    assert sorted(set(frozen) - {"same_as"}) == sorted(expect)  # same_as: what the cached batch repeats (collate)
    assert {"hidden", "sam_embeddings", "sam_sizes", "vision"} <= set(frozen)
    assert all(frozen[key] is None for key in expect if expect[key] is None)  # e.g. the selector's answer states
    assert frozen["phrase_image"] == expect["phrase_image"] and frozen["sam_sizes"] == expect["sam_sizes"]
    image_keys = list(grounder.refiner.image_shapes)  # sam_embeddings (+ sam_intermediate | sam_feat_s0, sam_feat_s1)
    assert len(image_keys) == {"tiny": 1, "tiny_sam_hq": 2, "tiny_sam2": 3}[sam]
    assert all(frozen[key].shape == expect[key].shape for key in image_keys)
    for key in ("maps", "vision", "hidden", *image_keys):
        for x, y in zip(expect[key], frozen[key], strict=True):
            assert torch.allclose(y.float(), x, rtol=2 ** -11, atol=1e-5), key  # + float32 noise of other batches
    assert all(torch.equal(x, y) for x, y in zip(online["sam_masks"], read["sam_masks"], strict=True))
    metrics, _ = train.train(cfg, torch.device("cpu"))
    assert metrics["synthetic_val"]["n"] == 36


def test_an_output_of_each_sequence_is_kept_per_sequence(tiny_qwen, synthetic_root, tmp_path, monkeypatch):
    """An output extract returns per sequence that is not the image's alone (the selector's answer states; here each
    sequence's phrase token ids) is stored per sequence: the sentences of one image keep their own."""
    extract = build.extract

    def with_answer(qwen, grounder, batch):
        frozen = extract(qwen, grounder, batch)
        host, answer = batch["host"], []
        for b, (ids, m) in enumerate(zip(host["input_ids"], host["mask_ids"])):  # per sentence: packed rows hold several
            seg = host["segment_ids"][b] if "segment_ids" in host else (m >= 0).long()
            answer += [ids[(m >= 0) & (seg == s)].float()[:, None, None] for s in range(1, int(seg.max()) + 1)]
        return dict(frozen, answer=answer)
    monkeypatch.setattr(build, "extract", with_answer)
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, train_data=[])
    cache.extract_all(cfg, shard_size=SHARD)
    unpacked = dataclasses.replace(cfg, pack_tokens=0)
    (online, _), = build.build_val_loaders(unpacked, tiny_qwen[2], cfg.val_data).values()
    (from_cache, _), = cached.build_val_loaders(cfg, cfg.val_data).values()
    answers = {}
    for a, b in zip(online, from_cache, strict=True):
        for ids, m, answer, image_id in zip(a["input_ids"], a["mask_ids"], b["frozen"]["answer"], b["image_id"],
                                            strict=True):
            assert torch.equal(answer.flatten(), ids[m >= 0].half())
            answers.setdefault(image_id, set()).add(tuple(answer.flatten().tolist()))
    assert max(len(a) for a in answers.values()) > 1  # an image with several sentences: each kept its own


# ------------------------------------------------------------------------------------------------- refusals

def test_a_cache_that_does_not_match_the_config_is_refused(extracted, tmp_path):
    cfg = extracted
    cache.check_cache(cfg, cfg.train_data + cfg.val_data)  # the matching one passes
    for change, named in ((dict(max_pixels=200704), "max_pixels: the cache has 0, the config gives 200704"),
                          (dict(vision_features=False), "vision_features: the cache has True, the config gives False"),
                          (dict(constant_phrase="the object"), "constant_phrase: the cache has '', the config gives "
                                                               "'the object'"),
                          (dict(model="other"), "model: the cache has"),
                          (dict(refiner=dict(sam="tiny"), synthetic=dict(root=str(tmp_path))),  # SAM by its weights
                           "refiner: the cache has {}, the config gives {'sam': 'tiny', 'sam_sha1': '"),
                          (dict(selector=dict(layers=1)), "selector: the cache has {}, the config gives {'layers': 1}"),
                          (dict(layout="image"), "set layout=sentence"),
                          (dict(protocol="flmm"), "must run online")):
        build.prepare_sam(dataclasses.replace(cfg, **change))  # the tiny SAM whose weights the cache would record
        with pytest.raises(SystemExit, match=re.escape(named)):
            cached.build_train_loader(dataclasses.replace(cfg, **change))
    with pytest.raises(SystemExit, match="max_pixels: the cache has 0"):  # nor extracted into it
        cache.extract_all(dataclasses.replace(cfg, max_pixels=200704), shard_size=SHARD)
    spec = dict(cfg.val_data[0], split="testA")
    with pytest.raises(SystemExit, match="split synthetic_testA is not in the cache"):
        cached.build_val_loaders(cfg, [spec])
    spec = dict(cfg.val_data[0], image_dir=cfg.val_data[0]["data_root"])  # the same name, other data
    with pytest.raises(SystemExit, match="split synthetic_val was extracted from"):
        cached.build_val_loaders(cfg, [spec])
    copy = shutil.copytree(cfg.cache_dir, tmp_path / "copy")
    moved = dataclasses.replace(cfg, cache_dir=str(copy))
    shutil.rmtree(copy / "synthetic_train" / "00003")
    with pytest.raises(SystemExit, match=r"shards \[3\] of 12 are missing"):
        cached.build_train_loader(moved)
    with open(copy / "meta.json") as f:
        text = f.read()
    with open(copy / "meta.json", "w") as f:
        f.write(text.replace(cache.code_version(), "0123456789abcdef"))
    with pytest.raises(SystemExit, match="code: the cache has '0123456789abcdef', the config gives"):
        cache.model_config(moved)


def test_code_version_follows_every_file_that_decides_the_frozen_outputs(tmp_path, monkeypatch):
    """An edit to the model (model.py), to the attention functions that compute the maps (capture.py) or to the
    inputs (qwen_inputs.py) must change the code version, so that check_cache refuses a cache made before it;
    an edit elsewhere (head.py trains from the cache) must not."""
    for name in ("model.py", "capture.py", "qwen_inputs.py", "head.py"):
        shutil.copy(os.path.join(cache.HERE, name), tmp_path / name)
    monkeypatch.setattr(cache, "HERE", str(tmp_path))
    before = cache.code_version()
    for name, changes in (("model.py", True), ("capture.py", True), ("qwen_inputs.py", True), ("head.py", False)):
        with open(tmp_path / name, "a") as f:
            f.write("\n# edited\n")
        assert (cache.code_version() != before) == changes, name
        before = cache.code_version()


# ------------------------------------------------------------------------------------------------- resuming

def test_a_killed_extraction_resumes_and_equals_an_uninterrupted_one(extracted, tmp_path, monkeypatch):
    cfg = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache"))
    close, calls = cache._ShardWriter.close, []

    def killed_in_shard_1(writer):  # the files of shard 1 are written, the rename never happens
        calls.append(writer.path)
        if len(calls) == 2:
            for f in writer.files.values():
                f.close()
            raise KeyboardInterrupt("killed")
        close(writer)
    monkeypatch.setattr(cache._ShardWriter, "close", killed_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        cache.extract_all(cfg, shard_size=SHARD)
    train_dir = tmp_path / "cache" / "synthetic_train"
    assert sorted(os.listdir(train_dir))[:2] == ["00000", "00001.tmp." + str(os.getpid())]
    monkeypatch.setattr(cache._ShardWriter, "close", close)
    written, init = [], cache._ShardWriter.__init__

    def counted(writer, folder, k):
        written.append((os.path.basename(folder), k))
        init(writer, folder, k)
    monkeypatch.setattr(cache._ShardWriter, "__init__", counted)
    cache.extract_all(cfg, shard_size=SHARD)
    # shard 0 kept, shard 1 redone, then the rest: 93 training sentences in 12 shards, 36 val sentences in 5
    assert written == [("synthetic_train", k) for k in range(1, 12)] + [("synthetic_val", k) for k in range(5)]
    assert not glob.glob(str(train_dir / "*.tmp.*"))
    assert_same_files(extracted.cache_dir, cfg.cache_dir)
    written.clear()
    cache.extract_all(cfg, shard_size=SHARD)  # complete: nothing to do
    assert written == []


def test_extraction_refuses_a_disk_too_small(extracted, tmp_path, monkeypatch):
    cfg = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(SystemExit, match=r"needs about [\d.]+ KiB but the disk has 1000 B free"):
        cache.extract_all(cfg, shard_size=SHARD)


# ------------------------------------------------------------------------------------------ two processes

def _join(rank, world, port):
    """A spawned test process as torchrun would start it: its rank's environment, one thread, the gloo group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _extract_worker(rank, world, port, cfg_dict, out):
    _join(rank, world, port)
    try:
        cache.extract_all(build.config_from_dict(cfg_dict), rank, world, shard_size=SHARD)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(cfg, out, timeout=120):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_extract_worker, args=(2, port, vars(cfg), str(out)), nprocs=2, join=False,
                                 start_method="fork")  # the test process has the modules loaded: seconds faster
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2 extraction ranks still run after {timeout} s")


def test_two_processes_write_the_same_cache_as_one(extracted, tmp_path):
    cfg = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache"))
    run_ranks(cfg, tmp_path)
    assert_same_files(extracted.cache_dir, cfg.cache_dir)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(cfg.cache_dir, "*", "*"))}
    run_ranks(cfg, tmp_path)  # complete: both ranks idle, nothing rewritten
    assert before == {p: os.path.getmtime(p) for p in glob.glob(os.path.join(cfg.cache_dir, "*", "*"))}


def _train_worker(rank, world, port, cfg_dict, out):
    _join(rank, world, port)
    try:
        metrics, grounder = train.train(build.config_from_dict(cfg_dict), torch.device("cpu"), rank, world)
        torch.save(dict(head=grounder.state_dict(), metrics=metrics), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ddp_from_the_cache_equals_one_process_with_the_same_global_batch(extracted, tmp_path, monkeypatch, optimizer):
    """torchrun-style training from the cache (2 gloo ranks x 2 images) against one process x 4 images: the same
    samples in the same steps (rank r takes the global batch's r-th, r+2-th, ...), each loss term divided by the
    step's count over both ranks. The frozen outputs are the same bits, so only float summation order differs (one
    batch of 4 vs two of 2 and an all-reduce). With SGD the heads agree to float32 noise (measured 1.5e-8 after
    weights moved 4e-3). With AdamW to 5e-6 (measured): Adam's first steps move a weight by ~lr * g / (|g| + eps),
    so a gradient entry near eps (1e-8) that rounding changes in its last digits moves its weight by a visible
    fraction of lr. Online the gap is larger (6e-4 after 4 steps, measured) because the VLM's forward pads 2
    sequences differently from 4 (its outputs then differ by ~1e-7, DESIGN.md's "batched equals single"), which
    Adam amplifies the same way; with SGD online differs by 1.5e-8 after one step. So the ~1e-4 is Adam on
    float rounding, not the data order or the counts (counts left per rank, or DDP's mean not undone, fail the SGD case)."""
    if optimizer == "sgd":
        monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    cfg = dataclasses.replace(extracted, batch_size=2, max_steps=4, vis_samples=0, out_dir=str(tmp_path / "two"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_train_worker, args=(2, port, vars(cfg), str(tmp_path)), nprocs=2, join=False,
                                 start_method="fork")  # forked after the monkeypatch: the ranks use it too
    deadline = time.time() + 120
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2 training ranks still run after 120 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"]) and r0["metrics"] == r1["metrics"]
    one = dataclasses.replace(cfg, batch_size=4, out_dir=str(tmp_path / "one"))
    _, grounder = train.train(one, torch.device("cpu"))
    a, b = grounder.state_dict(), r0["head"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    torch.manual_seed(cfg.seed)
    init = build.build_grounder(torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["grounder_kwargs"])
    moved = max(float((a[k] - init.state_dict()[k]).abs().max()) for k in a)
    print(f"{optimizer}: heads differ by {diff:.3g}, trained by {moved:.3g}")
    assert diff <= (1e-7 if optimizer == "sgd" else 1e-4) and moved > 1e-3


# ------------------------------------------------------------------------------- what a new user meets, by command

def test_an_unknown_split_is_named_and_nothing_is_written(extracted, tmp_path, capsys):
    cfg = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache"),
                              train_data=[dict(extracted.train_data[0], split="trian")])
    with pytest.raises(SystemExit, match=r"^data error: .*refs\(unc\).p: no split 'trian'; its splits are \[.*'train'"):
        cache.main(cfg)
    assert not os.path.exists(cfg.cache_dir)
    assert capsys.readouterr().out.startswith("model: ")  # the resolved config came first


def test_bad_images_at_extraction_are_counted_once_or_stop_in_one_line(extracted, tmp_path, capsys):
    root = str(tmp_path / "synthetic")
    shutil.copytree(extracted.train_data[0]["data_root"], root)
    spec = dict(extracted.train_data[0], data_root=root, image_dir=os.path.join(root, "images"))
    broken = sorted(os.listdir(spec["image_dir"]))[0]
    with open(os.path.join(spec["image_dir"], broken), "wb") as f:
        f.write(b"not a png")
    cfg = dataclasses.replace(extracted, cache_dir=str(tmp_path / "cache"), train_data=[spec], val_data=[])
    with pytest.raises(SystemExit, match=f"^data error: [^\\n]*{broken} \\(image_id .*UnidentifiedImageError[^\\n]*$"):
        cache.main(cfg)
    capsys.readouterr()
    cache.main(dataclasses.replace(cfg, skip_bad=True))
    out = capsys.readouterr().out
    assert "skipping" not in out and len(re.findall(r"skipped \d+ unreadable sample", out)) == 1, out
    assert re.search(rf"skipped [1-9]\d* unreadable sample\(s\) \(skip_bad=true\), e.g. .*{broken}", out)


def test_eval_scores_a_cached_run_from_its_cache(extracted, tmp_path, monkeypatch, capsys):
    """eval.py --cache reads the run's cache_dir: the same numbers as the run's final table, no VLM loaded."""
    import eval as evaluation
    cfg = dataclasses.replace(extracted, out_dir=str(tmp_path / "run"), max_steps=2, vis_samples=0)
    metrics, _ = train.train(cfg, torch.device("cpu"))
    monkeypatch.setattr(build, "build_qwen", lambda *a: pytest.fail("the VLM loaded for eval --cache"))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--cache", "--out",
                                      str(tmp_path / "m.json")])
    evaluation.main()
    results = json.load(open(tmp_path / "m.json"))["results"]
    assert results.keys() == metrics.keys() and all(results[k] == pytest.approx(metrics[k]) for k in metrics)


def test_repeated_sentences_are_extracted_once_and_stored_for_each_id(tiny_qwen, extracted, tmp_path, monkeypatch):
    """The constant-phrase baseline's cache: an image's sentences are all the same text, so the VLM runs it once per
    image (cache._unique_sentences) and every sentence id reads back its image's outputs, equal to the online ones of
    its own sequence within float16."""
    _, qwen, tokenizer = tiny_qwen
    cfg = dataclasses.replace(extracted, constant_phrase="the thing", train_data=[], cache_dir=str(tmp_path / "cache"))
    ran, extract = [], build.extract
    monkeypatch.setattr(build, "extract", lambda *a: ran.append(extract(*a)) or ran[-1])
    cache.extract_all(cfg, shard_size=SHARD)
    (online, _), = build.build_val_loaders(dataclasses.replace(cfg, pack_tokens=0), tokenizer, cfg.val_data).values()
    (from_cache, _), = cached.build_val_loaders(cfg, cfg.val_data).values()
    sentences = 0
    for a, b in zip(online, from_cache, strict=True):
        assert per_phrase(a, "ids") == per_phrase(b, "ids") and set(per_phrase(b, "phrases")) == {"the thing"}
        sentences += len(a["ids"])
        for x, y in zip(model.frozen_outputs(qwen, a, vision=True)["maps"], b["frozen"]["maps"], strict=True):
            deviation = (x - x.mean((-2, -1), keepdim=True)).abs()
            assert ((y - x).abs() <= FP16["rtol"] * deviation + FP16["atol"]).all(), (y - x).abs().max()
    items = online.dataset.items  # the standard protocol's sentences, in the order the shards cut them
    per_shard = {(k // SHARD, item["image_id"]) for k, item in enumerate(items)}
    assert sum(len(f["maps"]) for f in ran) == len(per_shard) < sentences == len(items)  # once per image in a shard


def test_the_head_runs_once_for_phrases_whose_cached_outputs_repeat(tiny_qwen, extracted, tmp_path):
    """A cached batch of the constant-phrase baseline marks each phrase that repeats an earlier one (same image,
    text, maps and features: cached.collate's same_as), and the grounder runs the U-Net once for them: the same
    logits and gradients as running it for every phrase. In the real cache nothing repeats."""
    cfg = dataclasses.replace(extracted, constant_phrase="the thing", train_data=[], cache_dir=str(tmp_path / "cache"),
                              batch_size=8)  # batches of two images
    cache.extract_all(cfg, shard_size=SHARD)
    torch.manual_seed(0)
    grounder = build.build_grounder(build.grounder_kwargs(cfg, cache.model_config(cfg)), torch.device("cpu"))
    runs, forward_grid = [], grounder.head._forward_grid
    grounder.head._forward_grid = lambda x, v: runs.append(len(x)) or forward_grid(x, v)
    repeated, mixed = 0, False
    for loader, constant in ((cached.build_val_loaders(cfg, cfg.val_data), True),
                             (cached.build_val_loaders(extracted, extracted.val_data), False)):
        (loader, _), = loader.values()
        for batch in loader:
            same_as = batch["frozen"]["same_as"]
            assert all(j <= i and batch["image_id"][i] == batch["image_id"][j] for i, j in enumerate(same_as))
            if not constant:
                assert same_as == list(range(len(same_as)))
                continue
            repeated += sum(i != j for i, j in enumerate(same_as))
            mixed |= len(set(batch["image_id"])) > 1
            outs, grads = [], []
            for frozen in (batch["frozen"], dict(batch["frozen"], same_as=None)):
                runs.clear()
                out = grounder(frozen)
                loss = sum(v.sum() for v, _ in heads.losses(out, batch).values())
                grads.append(torch.autograd.grad(loss, list(grounder.parameters())))
                outs.append(out["coarse"])
                assert sum(runs) == (len(set(same_as)) if frozen["same_as"] else len(same_as))
            # the U-Net's float32 results depend on how many phrases it runs at once (~1e-5): not on what is run
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*outs, strict=True))
            assert all((a - b).norm() <= 1e-4 * b.norm() for a, b in zip(*grads, strict=True))
    assert repeated > 0 and mixed


def test_every_sentence_per_step_reads_the_same_from_the_cache(tiny_qwen, extracted):
    """train_sentences: all: the cached loader gives the online one's phrases, ids and masks (every sentence of every
    object, each its own phrase), and the stored maps equal the packed online outputs within float16."""
    _, qwen, tokenizer = tiny_qwen
    cfg = dataclasses.replace(extracted, train_sentences="all")
    online, from_cache = build.build_train_loader(cfg, tokenizer), cached.build_train_loader(cfg)
    batching.set_epoch(online, 0)
    batching.set_epoch(from_cache, 0)
    seen, trained = [], set()
    for a, b in zip(online, from_cache, strict=True):
        for key in ("ids", "phrases", "masks", "supervised"):
            x, y = per_phrase(a, key), per_phrase(b, key)
            assert len(x) == len(y) and all(torch.equal(u, v) if torch.is_tensor(u) else u == v
                                            for u, v in zip(x, y)), key
        for x, y in zip(model.frozen_outputs(qwen, a, vision=True)["maps"], b["frozen"]["maps"], strict=True):
            deviation = (x - x.mean((-2, -1), keepdim=True)).abs()
            assert ((y - x).abs() <= FP16["rtol"] * deviation + FP16["atol"]).all(), (y - x).abs().max()
        seen += per_phrase(a, "ids")
        trained |= set(per_phrase(a, "image_id"))
    every = [i for item in online.dataset.items if item["image_id"] in trained for e in item["entries"] for i in e["ids"]]
    assert sorted(seen) == sorted(every) and len(every) > 2 * len(trained)  # each sentence once, ~11 per image
