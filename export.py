"""Export a trained grounder to share it: the trainable weights as safetensors, the resolved config, a model card.

    python export.py --ckpt out/demo/ckpt.pt --out exports/demo
    python export.py --ckpt out/refcoco/ckpt.pt --out exports/refcoco --push_to_hub you/qwen2.5-vl-3b-flmm-refcoco

The directory (or the Hub repo) then works wherever a ckpt.pt does: ground.load_grounder(DIR), eval.py --ckpt DIR,
chat.py --ckpt DIR. It holds no frozen weights: the base VLM (and SAM) load from the ids in config.json.
    model.safetensors  the grounder's state dict (U-Net head, + refiner / selector), never pickle
    config.json        format, base_vlm (name + architecture), sam, grounder_kwargs, image_settings, prompt, step,
                       config (the run's resolved Config), code (git commit, cache.code_version)
    README.md          a model card: what it is, the run's metrics and baselines, the command that trained it
"""
import argparse
import json
import os
import subprocess

import yaml
from safetensors.torch import save_file

import build
import cache
import qwen_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit():
    """This checkout's commit (+ "-dirty" with uncommitted changes to tracked files), or None outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True)
    head = git("rev-parse", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def metrics_markdown(results):
    """{name: metrics} -> a markdown table (the columns any row has, metrics.print_table's order)."""
    order = ["cIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "N-acc", "T-acc", "AR", "span_F1", "n"]
    keys = [k for k in order if any(k in r for r in results.values())]
    lines = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r[k]:d}" if k == "n" else f"{r[k]:.2f}" if k in r else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(meta, run_dir):
    """README.md text: the model, how to use it, the run's numbers (metrics.json / baselines.json / log.jsonl that
    train.py wrote beside the checkpoint) and how it was trained (commands.txt, else the resolved config)."""
    cfg, base = meta["config"], meta["base_vlm"]
    head = meta["grounder_kwargs"]["head"]
    parts = ["---", "library_name: pytorch", "tags: [referring-segmentation, grounding, f-lmm, qwen-vl]", "---", "",
             f"# F-LMM grounder for {base['name']}", "",
             f"A mask head trained on the attention maps of the frozen VLM `{base['name']}` ({base['model_type']}, "
             f"{base['layers']} layers x {base['heads']} heads = {head['in_channels']} maps per phrase)"
             + (f", refined by SAM `{meta['sam']}`" if meta["sam"] else "")
             + (", with a learned phrase selector" if meta["grounder_kwargs"].get("selector") else "")
             + f". Only these weights are here ({meta['trainable_parameters'] / 1e6:.2f}M parameters, step "
               f"{meta['step']}); " + ("the VLM and SAM load from their own ids" if meta["sam"] else
                                       "the VLM loads from its own id")
             + (" (`tiny`: the demo's random model, rebuilt from config.json's `tiny_model` by "
                "synthetic.build_tiny_qwen)" if base["name"] == "tiny" else "") + ".", "",
             "```python", "import ground", "from PIL import Image", "",
             'g = ground.load_grounder("THIS_REPO_OR_DIR")',
             'masks = g.ground(Image.open("photo.jpg"), ["the dog on the left"])  # bool (H, W) numpy per phrase',
             "```", "", "## Results", ""]
    metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    baselines = _read_json(os.path.join(run_dir, "baselines.json"))
    if baselines:
        parts += ["Ours beside the same head trained without language (a constant phrase) and a random object of the "
                  "image (train.py baselines=true):", "", metrics_markdown(baselines), ""]
    elif metrics:
        parts += ["The run's final evaluation (train.py, metrics.json):", "", metrics_markdown(metrics), ""]
    else:
        parts += [f"No metrics.json beside the checkpoint ({run_dir}): score it with `python eval.py --ckpt DIR`.", ""]
    log = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            parts += [f"Last training log line: step {lines[-1]['step']}, loss {lines[-1]['loss']:.4f}.", ""]
    parts += ["## Training", ""]
    commands = os.path.join(run_dir, "commands.txt")
    if os.path.isfile(commands):
        with open(commands) as f:
            parts += ["The command(s) that trained it (train.py writes commands.txt):", "", "```", f.read().strip(),
                      "```", ""]
    parts += ["The resolved config (also config.json's `config`): `python train.py --cfg train_config.yaml` "
              "repeats the run.", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "",
              f"Code: git commit `{meta['code']['git_commit']}`, frozen-output code version "
              f"`{meta['code']['code_version']}` (cache.code_version).", ""]
    return "\n".join(parts)


def export(ckpt_path, out):
    """Write the export directory for a checkpoint -> its config.json dict."""
    ckpt = build.load_checkpoint(ckpt_path)
    cfg = build.config_from_dict(ckpt["config"], ckpt_path)
    kwargs = ckpt["grounder_kwargs"]
    meta = dict(format=build.EXPORT_FORMAT, base_vlm=ckpt.get("base_vlm") or build.base_vlm(cfg),
                sam=kwargs["refiner"]["sam"] if kwargs["refiner"] else None, grounder_kwargs=kwargs,
                image_settings=build.image_settings(cfg), prompt=qwen_inputs.DEFAULT_PROMPT, system=qwen_inputs.SYSTEM,
                step=ckpt["step"], trainable_parameters=sum(v.numel() for v in ckpt["grounder"].values()),
                config=ckpt["config"], code=dict(git_commit=git_commit(), code_version=cache.code_version()))
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt["grounder"].items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out, "train_config.yaml"), "w") as f:
        yaml.safe_dump(ckpt["config"], f, sort_keys=False)
    run_dir = os.path.dirname(os.path.abspath(ckpt_path)) if os.path.isfile(ckpt_path) else None
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(meta, run_dir or out))
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="train.py's ckpt.pt (its out_dir holds the metrics for the card)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--push_to_hub", metavar="REPO", help="then upload the directory to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    args = parser.parse_args()
    meta = export(args.ckpt, args.out)
    print(f"{args.out}: model.safetensors ({meta['trainable_parameters'] / 1e6:.2f}M parameters, step {meta['step']}), "
          f"config.json, train_config.yaml, README.md; base VLM {meta['base_vlm']['name']}")
    if args.push_to_hub:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True, private=args.private)
        info = api.upload_folder(folder_path=args.out, repo_id=args.push_to_hub,
                                 commit_message=f"export of {args.ckpt} (step {meta['step']})")
        print(f"pushed: {info}")


if __name__ == "__main__":
    main()
