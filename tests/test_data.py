"""data.py on small fixtures written here in the refer, gRefCOCO and PNG formats, and on the synthetic generator."""
import json
import os
import pickle

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

import batching
import data
import qwen_inputs
import synthetic

# pycocotools' decode under numpy 2 warns on every call; nothing here can change it
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def uncompressed_rle(mask):
    """COCO crowd-style RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    counts, value, run = [], 0, 0
    for v in mask.flatten(order="F"):
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return dict(size=list(mask.shape), counts=counts)


def reference_mask(segmentation, h, w):
    """pycocotools the documented way: frPyObjects (polygons, uncompressed RLE), merge, decode."""
    if isinstance(segmentation, dict) and not isinstance(segmentation["counts"], list):
        return mask_utils.decode(segmentation).astype(bool)  # compressed RLE: already what decode takes
    rles = mask_utils.frPyObjects(segmentation, h, w)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool)


def save_image(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def sentences(*texts, first=0):
    return [dict(sent=t, raw=t, tokens=t.split(), sent_id=first + i) for i, t in enumerate(texts)]


CROWD = np.zeros((56, 84), bool)
CROWD[30:50, 5:30] = True
DISK = np.hypot(*np.mgrid[:50, :70] - np.array([25, 35])[:, None, None]) < 12
ANNOTATIONS = [  # image 1 is 56x84 (kept by smart_resize), image 2 is 50x70 (resized to 56x56: round(2.5) = 2)
    dict(id=11, image_id=1, category_id=1, iscrowd=0,
         segmentation=[[5, 5, 30, 5, 30, 25, 5, 25], [40.5, 30, 50, 30.5, 45, 45]]),
    dict(id=12, image_id=1, category_id=2, iscrowd=0, segmentation=[[55, 5, 80, 5, 80, 50, 70, 50, 70, 20, 55, 20]]),
    dict(id=13, image_id=1, category_id=1, iscrowd=1, segmentation=uncompressed_rle(CROWD)),
    dict(id=21, image_id=2, category_id=3, iscrowd=0,
         segmentation={**mask_utils.encode(np.asfortranarray(DISK.astype(np.uint8))), "size": [50, 70]}),
]
ANNOTATIONS[3]["segmentation"]["counts"] = ANNOTATIONS[3]["segmentation"]["counts"].decode()
IMAGES = [dict(id=1, file_name="COCO_train2014_000000000001.jpg", height=56, width=84),
          dict(id=2, file_name="COCO_train2014_000000000002.jpg", height=50, width=70)]
REFS = [
    dict(ref_id=100, ann_id=11, image_id=1, split="train", category_id=1, sentences=sentences("left box", "the two blocks", first=0)),
    dict(ref_id=101, ann_id=12, image_id=1, split="train", category_id=2, sentences=sentences("hook shape", first=2)),
    dict(ref_id=102, ann_id=13, image_id=1, split="testA", category_id=1, sentences=sentences("the crowd", first=3)),
    dict(ref_id=103, ann_id=21, image_id=2, split="test", category_id=3, sentences=sentences("round thing", first=4)),
    dict(ref_id=104, ann_id=21, image_id=2, split="testB", category_id=3, sentences=sentences("disk", "a disk", first=5)),
]


def write_refer(root, refs=REFS, images=IMAGES, annotations=ANNOTATIONS, dataset="refcoco", split_by="unc"):
    os.makedirs(os.path.join(root, dataset), exist_ok=True)
    for r in refs:
        r.setdefault("file_name", f"COCO_train2014_{r['image_id']:012d}_{r['ann_id']}.jpg")  # refer's: not a file
        r.setdefault("sent_ids", [s["sent_id"] for s in r["sentences"]])
    with open(os.path.join(root, dataset, f"refs({split_by}).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(root, dataset, "instances.json"), "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=[]), f)
    for im in images:
        save_image(os.path.join(root, "images", im["file_name"]), im["height"], im["width"], seed=im["id"])
    return root


@pytest.fixture
def refer_root(tmp_path):
    return write_refer(str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen):
    return tiny_qwen[2]


def spec(root, split, **kw):
    return dict(kind="refer", data_root=root, dataset="refcoco", split_by="unc", split=split,
                image_dir=os.path.join(root, "images"), **kw)


# ------------------------------------------------------------------------------------------- records, masks

def test_load_refer_records_and_exact_splits(refer_root):
    counts = {s: len(data.load_refer(refer_root, "refcoco", "unc", s)) for s in ("train", "test", "testA", "testB")}
    assert counts == dict(train=2, test=1, testA=1, testB=1)
    with pytest.raises(data.DataError, match=r"no split 'val'; its splits are \['test', 'testA', 'testB', 'train'\]"):
        data.load_refer(refer_root, "refcoco", "unc", "val")  # a split the file does not have is an error
    rec = data.load_refer(refer_root, "refcoco", "unc", "train")[0]
    assert rec["ref_id"] == 100 and rec["ann_id"] == 11 and rec["ann_ids"] == [11] and rec["image_id"] == 1
    assert rec["file_name"] == "COCO_train2014_000000000001.jpg"  # from instances.json, not the refs' own
    assert (rec["height"], rec["width"], rec["category_id"], rec["no_target"]) == (56, 84, 1, False)
    assert rec["sentences"] == ["left box", "the two blocks"] and rec["sent_ids"] == [0, 1]
    assert rec["segmentation"] == ANNOTATIONS[0]["segmentation"] == rec["segmentations"][0]


def test_a_split_is_read_once_until_its_files_change(refer_root, monkeypatch):
    """A run builds a split's dataset several times (extraction, training, the baselines): the files are parsed once
    per process, each call gets records of its own, and a rewritten file is read again."""
    reads, load_json = [], data._load_json
    monkeypatch.setattr(data, "_load_json", lambda path: reads.append(path) or load_json(path))
    first = data.load_refer(refer_root, "refcoco", "unc", "train")
    first[0]["sentences"] = ["changed by the caller"]
    again = data.load_refer(refer_root, "refcoco", "unc", "train")
    assert len(reads) == 1 and again[0]["sentences"] == ["left box", "the two blocks"]
    refs = [dict(r, sentences=sentences("renamed", first=r["sentences"][0]["sent_id"])) for r in REFS]
    write_refer(refer_root, refs=refs)
    assert data.load_refer(refer_root, "refcoco", "unc", "train")[0]["sentences"] == ["renamed"] and len(reads) == 2


def test_decode_mask_equals_pycocotools():
    for ann, (h, w) in zip(ANNOTATIONS, [(56, 84)] * 3 + [(50, 70)]):
        seg = ann["segmentation"]
        mask = data.decode_mask(seg, h, w)
        assert mask.dtype == bool and mask.shape == (h, w) and mask.any()
        assert np.array_equal(mask, reference_mask(seg, h, w))
    assert np.array_equal(data.decode_mask(ANNOTATIONS[2]["segmentation"], 56, 84), CROWD)
    rle = ANNOTATIONS[3]["segmentation"]
    assert np.array_equal(data.decode_mask(rle, 50, 70), DISK)
    assert np.array_equal(data.decode_mask(dict(rle, counts=rle["counts"].encode()), 50, 70), DISK)  # bytes counts
    with pytest.raises(data.DataError, match="RLE size"):
        data.decode_mask(rle, 70, 50)
    with pytest.raises(data.DataError, match="neither"):
        data.decode_mask({"counts": "abc"}, 10, 10)
    with pytest.raises(data.DataError, match="odd"):
        data.decode_mask([[1, 2, 3, 4, 5, 6, 7]], 10, 10)
    assert not data.union_mask([], 5, 6).any()


def test_refs_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    os.makedirs(tmp_path / "refcoco")
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Exploit()]))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p.*refusing.*system"):
        data.load_refer(str(tmp_path), "refcoco", "unc", "train")
    assert not marker.exists()


def write_grefcoco(root):
    refs = [dict(ref_id=1, ann_id=[11, 12], image_id=1, split="val", category_id=[1, 2], no_target=False,
                 sentences=sentences("both blocks", first=0)),
            dict(ref_id=2, ann_id=[-1], image_id=1, split="val", category_id=[], no_target=True,
                 sentences=sentences("the elephant", first=1)),
            dict(ref_id=3, ann_id=[21], image_id=2, split="val", category_id=[3], no_target=False,
                 sentences=sentences("disk", first=2)),
            dict(ref_id=4, ann_id=[21], image_id=2, split="testA", category_id=[3], no_target=False,
                 sentences=sentences("disk", first=3))]
    os.makedirs(os.path.join(root, "grefcoco"))
    with open(os.path.join(root, "grefcoco", "grefs(unc).json"), "w") as f:
        json.dump(refs, f)
    with open(os.path.join(root, "grefcoco", "instances.json"), "w") as f:
        json.dump(dict(images=IMAGES, annotations=ANNOTATIONS, categories=[]), f)
    return root


def test_grefcoco_multi_and_no_target(refer_root, tokenizer):
    write_grefcoco(refer_root)
    recs = data.load_grefcoco(refer_root, "val")
    assert [r["ref_id"] for r in recs] == [1, 2, 3] and [r["no_target"] for r in recs] == [False, True, False]
    assert recs[0]["ann_ids"] == [11, 12] and recs[1]["ann_ids"] == [] and recs[1]["segmentations"] == []
    union = reference_mask(ANNOTATIONS[0]["segmentation"], 56, 84) | reference_mask(ANNOTATIONS[1]["segmentation"], 56, 84)
    assert np.array_equal(data.union_mask(recs[0]["segmentations"], 56, 84), union)
    ds = batching.build_dataset(dict(kind="grefcoco", data_root=refer_root, split="val",
                                 image_dir=os.path.join(refer_root, "images")), tokenizer, train=False, protocol="flmm")
    s = ds[0]  # image 1: both refs in one sample
    assert s["phrases"] == ["both blocks", "the elephant"] and s["no_target"] == [False, True]
    assert s["plural"] == [True, False] and torch.equal(s["gt_masks"][0], torch.from_numpy(union))
    assert not s["gt_masks"][1].any() and not s["masks"][1].any()


def write_png(root):
    """Panoptic PNG (segments 1+256*2, 7, 5*256**2 things/stuff) and two narratives, one with nothing grounded."""
    ids = np.zeros((40, 60), np.int64)
    ids[5:20, 5:20], ids[5:20, 30:45], ids[25:, :] = 1 + 256 * 2, 7, 5 * 256 ** 2
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8)
    os.makedirs(os.path.join(root, "panoptic"))
    Image.fromarray(rgb).save(os.path.join(root, "panoptic", "000000000009.png"))
    save_image(os.path.join(root, "val2017", "000000000009.jpg"), 40, 60)
    panoptic = dict(images=[dict(id=9, file_name="000000000009.jpg", height=40, width=60)],
                    annotations=[dict(image_id=9, file_name="000000000009.png",
                                      segments_info=[dict(id=513, category_id=1), dict(id=7, category_id=1),
                                                     dict(id=5 * 256 ** 2, category_id=200)])],
                    categories=[dict(id=1, name="person", isthing=1), dict(id=200, name="grass", isthing=0)])
    narratives = [
        dict(image_id="9", caption="In this image we can see two people, a dog and grass.", segments=[
            dict(utterance="In this image we can see", segment_ids=[], plural=False, noun=False),
            dict(utterance="two people", segment_ids=["513", "7"], plural=True, noun=True),
            dict(utterance="a dog", segment_ids=[123456], plural=False, noun=True),  # not in segments_info
            dict(utterance="and", segment_ids=[], plural=False, noun=False),
            dict(utterance="grass.", segment_ids=[5 * 256 ** 2], plural=False, noun=True)]),
        dict(image_id=9, caption="Nothing grounded.", segments=[
            dict(utterance="Nothing grounded.", segment_ids=[], plural=False, noun=False)])]
    paths = [os.path.join(root, n) for n in ("png_coco_val2017.json", "panoptic_val2017.json")]
    for path, obj in zip(paths, (narratives, panoptic)):
        with open(path, "w") as f:
            json.dump(obj, f)
    return dict(kind="png", png_json=paths[0], panoptic_json=paths[1], panoptic_dir=os.path.join(root, "panoptic"),
                image_dir=os.path.join(root, "val2017")), ids


def test_png_narratives(tmp_path, tokenizer):
    png_spec, ids = write_png(str(tmp_path))
    items = data.load_png(png_spec["png_json"], png_spec["panoptic_json"], png_spec["panoptic_dir"])
    assert len(items) == 1  # the narrative with nothing grounded is not a sample
    entries = items[0]["entries"]
    assert entries[1]["segment_ids"] == [513, 7] and items[0]["panoptic_file"].endswith("000000000009.png")
    ds = batching.build_dataset(png_spec, tokenizer, train=False)
    s = ds[0]
    assert s["phrases"] == ["In this image we can see", "two people", "a dog", "and", "grass."]
    assert s["supervised"] == [False, True, False, False, True] and s["ids"] == ["0/0", "0/1", "0/2", "0/3", "0/4"]
    assert s["plural"][1] and not s["plural"][4] and s["isthing"][1] and not s["isthing"][4]
    assert s["gt_masks"].shape == (5, 40, 60) and s["masks"].shape[0] == 5
    assert torch.equal(s["gt_masks"][1], torch.from_numpy((ids == 513) | (ids == 7)))
    assert torch.equal(s["gt_masks"][4], torch.from_numpy(ids == 5 * 256 ** 2))
    assert not s["gt_masks"][[0, 2, 3]].any()
    assert (s["mask_ids"] >= 0).sum() > 0 and s["mask_ids"].max() == 4


# -------------------------------------------------------------------------------------------------- samples

def check_sample(s, expect_phrases):
    _, gh, gw = s["image_grid_thw"][0].tolist()
    K = len(expect_phrases)
    assert s["phrases"] == expect_phrases and len(s["ids"]) == K
    assert s["pixel_values"].shape == (gh * gw, qwen_inputs.PATCH_DIM) and s["pixel_values"].dtype == torch.float32
    assert s["masks"].shape == (K, gh * 14, gw * 14) and s["masks"].dtype == torch.bool
    assert s["gt_masks"].dtype == torch.bool and s["gt_masks"].shape[0] == K
    assert sorted(set(s["mask_ids"].tolist()) - {-1}) == list(range(K))
    assert int((s["mm_token_type_ids"] == 1).sum()) == gh * gw // 4


def test_protocols_and_masks(refer_root, tokenizer):
    std = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=False, protocol="standard")
    assert len(std) == 3 and [s["phrases"] for s in std] == [["left box"], ["the two blocks"], ["hook shape"]]
    assert [std[i]["ids"] for i in range(3)] == [["100/0"], ["100/1"], ["101/2"]]
    flmm = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=False, protocol="flmm")
    assert len(flmm) == 1
    s = flmm[0]
    check_sample(s, ["left box", "hook shape"])
    assert s["image_id"] == 1 and s["file_name"] == IMAGES[0]["file_name"] and s["supervised"] == [True, True]
    for k, ann in enumerate(ANNOTATIONS[:2]):
        gt = reference_mask(ann["segmentation"], 56, 84)
        assert torch.equal(s["gt_masks"][k], torch.from_numpy(gt))
        assert torch.equal(s["masks"][k], torch.from_numpy(gt))  # 56x84 is kept as is by smart_resize
    resized = batching.build_dataset(spec(refer_root, "testB"), tokenizer, train=False)[0]  # 50x70 -> 56x56
    check_sample(resized, ["disk"])
    assert resized["gt_masks"].shape == (1, 50, 70) and resized["masks"].shape == (1, 56, 56)
    assert abs(resized["masks"].sum().item() * (50 * 70) / (56 * 56) - DISK.sum()) < 0.05 * DISK.sum()
    crowd = batching.build_dataset(spec(refer_root, "testA"), tokenizer, train=False)[0]
    assert torch.equal(crowd["gt_masks"][0], torch.from_numpy(CROWD))
    with pytest.raises(ValueError, match="exactly the keys"):
        batching.build_dataset(dict(spec(refer_root, "train"), splitby="unc"), tokenizer, train=False)


def test_training_sample_is_a_function_of_seed_epoch_index(refer_root, tokenizer):
    ds = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=True, seed=3)
    assert len(ds) == 1  # one sample per image, every object once
    draws = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        check_sample(s, s["phrases"])
        assert s["phrases"][0] in ("left box", "the two blocks") and s["phrases"][1] == "hook shape"
        draws.append(s["phrases"][0])
    assert len(set(draws)) == 2  # the sentence changes with the epoch
    again = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=True, seed=3)
    again.set_epoch(5)
    assert again[0]["phrases"][0] == draws[5]  # a resumed run draws the same


@pytest.mark.parametrize("pack", [2048, 0])
def test_every_sentence_of_each_object_trains_with_its_objects_mask(refer_root, tokenizer, pack):
    """train_sentences: all: one phrase per sentence of every object (each with its object's mask, flags and
    sentence id), in every epoch, packed behind the image prefix or one sequence each; layout=image refuses it."""
    ds = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=True, seed=3, layout="sentence",
                                pack_tokens=pack, every_sentence=True)
    one = batching.build_dataset(spec(refer_root, "train"), tokenizer, train=True, seed=3, layout="sentence",
                                 pack_tokens=pack)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        rows = ds[0]
        phrases = [p for r in rows for p in r["phrases"]]
        assert phrases == ["left box", "the two blocks", "hook shape"]
        assert [i for r in rows for i in r["ids"]] == ["100/0", "100/1", "101/2"]
        masks = torch.cat([r["masks"] for r in rows])
        drawn = one[0]  # one sentence per object: the masks of objects 0 and 1
        objects = torch.cat([r["masks"] for r in drawn])
        assert torch.equal(masks, objects[[0, 0, 1]]) and not torch.equal(objects[0], objects[1])
        assert [len(r["supervised"]) for r in rows] == [len(r["phrases"]) for r in rows]  # flags per phrase
    with pytest.raises(ValueError, match="needs layout=sentence"):
        batching.build_dataset(spec(refer_root, "train"), tokenizer, train=True, every_sentence=True)


def test_loader_with_workers(tmp_path, tokenizer):
    root = synthetic.make_synthetic(str(tmp_path / "syn"), num_train=12, num_val=2, num_test=1)
    train_spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc", split="train",
                      image_dir=os.path.join(root, "images"))
    single = batching.build_dataset(train_spec, tokenizer, train=True, seed=1)
    ds = torch.utils.data.ConcatDataset([single, single])  # a training mix
    loader = batching.build_loader(ds, 4, num_workers=2, shuffle=True, seed=1)
    seen = {}
    for epoch in (0, 1, 0):  # the workers persist: the epoch must still reach them
        batching.set_epoch(loader, epoch)
        batches = list(loader)
        assert sum(len(b["ids"]) for b in batches) == len(ds) and all(b["skipped"] == [] for b in batches)
        b = batches[0]
        assert b["input_ids"].shape == b["mask_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 4
        assert b["image_grid_thw"].shape == (4, 3) and isinstance(b["masks"], list) and len(b["masks"]) == 4
        assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
        drawn = [(i, ids) for b in batches for i, ids in zip(b["image_id"], b["ids"])]
        expect = {s["image_id"]: s["ids"] for s in (single[i] for i in range(len(single)))}  # main process, same epoch
        assert all(expect[i] == ids for i, ids in drawn)
        seen.setdefault(epoch, drawn)
        assert seen[epoch] == drawn  # same order and draws for the same (seed, epoch)
    assert seen[0] != seen[1] and {i for i, _ in seen[0]} == {i for i, _ in seen[1]}


# ------------------------------------------------------------------------------------------------ bad input

def write_bad(root):
    """Image 1 fine, image 2 corrupt, image 3 missing, image 4 too extreme for smart_resize; one unknown ann_id,
    one empty sentence."""
    images = IMAGES + [dict(id=3, file_name="missing.jpg", height=56, width=84),
                       dict(id=4, file_name="thin.png", height=2, width=500)]
    anns = ANNOTATIONS + [dict(id=31, image_id=3, category_id=1, iscrowd=0, segmentation=[[1, 1, 9, 1, 9, 9]]),
                          dict(id=41, image_id=4, category_id=1, iscrowd=0, segmentation=[[0, 0, 400, 0, 400, 2]])]
    refs = [dict(REFS[0]), dict(REFS[3], split="train"),
            dict(ref_id=105, ann_id=31, image_id=3, split="train", category_id=1, sentences=sentences("gone", first=7)),
            dict(ref_id=106, ann_id=999, image_id=1, split="train", category_id=1, sentences=sentences("who", first=8)),
            dict(ref_id=107, ann_id=12, image_id=1, split="train", category_id=2, sentences=sentences("  ", first=9)),
            dict(ref_id=108, ann_id=41, image_id=4, split="train", category_id=1, sentences=sentences("line", first=10))]
    write_refer(root, refs, images, anns)
    os.remove(os.path.join(root, "images", "missing.jpg"))
    with open(os.path.join(root, "images", IMAGES[1]["file_name"]), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_bad_input_strict_names_the_file_and_ref(tmp_path, tokenizer):
    root = write_bad(str(tmp_path))
    with pytest.raises(data.DataError, match=r"refs\(unc\)\.p: ref_id 106: ann_id \[999\] not in .*instances.json"):
        data.load_refer(root, "refcoco", "unc", "train")
    records = [r for r in data.load_refer(root, "refcoco", "unc", "train", skip_bad=True) if r["ref_id"] != 105]
    with pytest.raises(data.DataError, match=r"missing.jpg: no such file \(image_id 3, ids \['105/7'\]\)"):
        batching.GroundingDataset(data.refer_items(data.load_refer(root, "refcoco", "unc", "train", skip_bad=True),
                                               "standard"), tokenizer, image_dir=os.path.join(root, "images"))
    ds = batching.GroundingDataset(data.refer_items(records, "standard"), tokenizer, image_dir=os.path.join(root, "images"))
    by_file = {item["file_name"]: i for i, item in enumerate(ds.items)}
    with pytest.raises(data.DataError, match=r"COCO_train2014_000000000002.jpg \(image_id 2, ids \['103/4'\]\)"):
        ds[by_file[IMAGES[1]["file_name"]]]
    with pytest.raises(data.DataError, match=r"thin.png .*aspect ratio"):
        ds[by_file["thin.png"]]


def test_bad_input_skipped_and_counted(tmp_path, tokenizer):
    root = write_bad(str(tmp_path))
    ds = batching.build_dataset(spec(root, "train"), tokenizer, train=False, skip_bad=True)
    assert len(ds.skipped) == 3  # unknown ann_id, empty sentence, missing image
    assert any("ref_id 106" in m for m in ds.skipped) and any("missing.jpg" in m for m in ds.skipped)
    loader = batching.build_loader(ds, 2, num_workers=2)
    batches = list(loader)
    assert sum(len(b["skipped"]) for b in batches) == 2  # the corrupt image and the extreme one, found in workers
    assert sorted(p for b in batches for ps in b.get("phrases", []) for p in ps) == ["left box", "the two blocks"]


# ------------------------------------------------------------------------------------------------ synthetic

def test_synthetic(tmp_path):
    kw = dict(seed=7, num_train=20, num_val=4, num_test=3)
    a, b = synthetic.make_synthetic(str(tmp_path / "a"), **kw), synthetic.make_synthetic(str(tmp_path / "b"), **kw)
    for name in ["synthetic/refs(unc).p", "synthetic/instances.json"] + [f"images/{f}" for f in os.listdir(f"{a}/images")]:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name
    other = synthetic.make_synthetic(str(tmp_path / "c"), **dict(kw, seed=8))
    assert open(f"{a}/synthetic/instances.json").read() != open(f"{other}/synthetic/instances.json").read()
    stamp = os.path.getmtime(f"{a}/synthetic/refs(unc).p")
    assert synthetic.make_synthetic(a, **kw) == a and os.path.getmtime(f"{a}/synthetic/refs(unc).p") == stamp  # cached
    assert not [f for f in os.listdir(a) if f.startswith(".tmp")]

    instances = json.load(open(f"{a}/synthetic/instances.json"))
    scene = {}
    for ann in instances["annotations"]:
        scene.setdefault(ann["image_id"], []).append(ann)
    n_sent = 0
    for split, n_images in dict(train=20, val=4, testA=3, testB=3).items():
        recs = data.load_refer(a, "synthetic", "unc", split)
        assert len({r["image_id"] for r in recs}) <= n_images and len(recs) >= n_images
        for r in recs:
            objects = [ann["attributes"] for ann in scene[r["image_id"]]]
            target = next(x["attributes"] for x in scene[r["image_id"]] if x["id"] == r["ann_id"])
            for sent in r["sentences"]:
                assert synthetic.synthetic_matches(sent, objects) == 1, (sent, objects)
                words = sent.split()  # the referred object's colour and shape are always named
                assert target["colour"] in words and target["shape"] in words, (sent, target)
                assert all(w in synthetic.WORD_ATTRIBUTE or w in ("the", "on", "in", "at") for w in words)
                n_sent += 1
            pixels = np.asarray(Image.open(f"{a}/images/{r['file_name']}"))
            mask = data.decode_mask(r["segmentation"], r["height"], r["width"])
            assert mask.shape == pixels.shape[:2] == (224, 224) and mask.sum() > 50
            assert (pixels[mask] == synthetic.COLOURS[target["colour"]]).all()  # the mask is the visible part: the object's colour everywhere
    assert n_sent > 60 and set(synthetic.synthetic_texts()) >= {"the red circle", "big blue star in the top left"}


def test_resize_masks_keeps_a_half_covered_pixel():
    """The box filter's footprint of a target pixel half covered is 127.5 -> 128 in PIL's uint8: it is in the mask
    (>= 128), as a majority-or-tie of its footprint; a third covered is out."""
    half = np.array([[[True, False]]])  # (1, 1, 2) -> (1, 1, 1)
    assert data.resize_masks(half, 1, 1).tolist() == [[[True]]]
    third = np.array([[[True, False, False]]])
    assert data.resize_masks(third, 1, 1).tolist() == [[[False]]]
