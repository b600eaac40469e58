"""Answer, then ground: the frozen VLM answers with its own chat, one more forward with that answer as the assistant
turn gives the attention maps of the chosen phrases, the trained head (+ refiner) turns them into masks.

    python chat.py --ckpt out/x/ckpt.pt --image photo.jpg --ask "What is the man on the left holding?"
    python chat.py --ckpt out/x/ckpt.pt --image photo.jpg --ask "..." --phrases "the man,the umbrella"
    python chat.py --ckpt out/x/ckpt.pt --image photo.jpg --ask "..." --answer "a red circle and a blue star" \\
        --phrases "a red circle,a blue star"            # ground phrases of an answer you give (no generation)
    python chat.py --ckpt out/x/ckpt.pt --image photo.jpg --text "the dog on the left"   # ground the text itself
    torchrun --nproc_per_node=8 chat.py --ckpt out/x/ckpt.pt --reasonseg data/ReasonSeg/val   # gIoU / cIoU

Phrases: --phrases chosen by hand, else the checkpoint's learned selector (config `selector`), which tags the answer
tokens from the same forward. Without a selector and without --phrases the answer is printed with a line saying how
to ground its phrases (--answer "..." --phrases "..."). Generation is transformers' own `generate` (greedy unless --do_sample); the attention
functions load_qwen installs compute exactly stock SDPA when nothing is captured (tests/test_chat.py checks it).
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import build
import data
import draw
import metrics as scoring
import model
import qwen_inputs
import refiner
import selector as selection

COT_PROMPT = "{question} Answer with the name of the object only, in a few words."  # F-LMM's visual chain-of-thought
# One colour per phrase (cycled after 8), none of them a synthetic object's (red, green, blue, yellow, purple; every
# one >= 90 apart in RGB) nor the light grey background, as eval.py's overlays: a tint never reads as another object.

# ------------------------------------------------------------------------------------------------ answer

def generate(qwen, tokenizer, images, questions, image_settings, *, max_new_tokens=64, **sampling):
    """PIL images + questions -> the VLM's answers (str), one batched, left-padded `qwen.generate` (model.generate).
    sampling: transformers' generate arguments (do_sample, temperature, top_p, top_k); greedy without them."""
    prompts = []
    for image, question in zip(images, questions, strict=True):
        pixel_values, grid = qwen_inputs.patchify(image, **image_settings)
        prompts.append((*qwen_inputs.prompt_ids(tokenizer, grid, question), pixel_values, grid))
    return model.generate(qwen, tokenizer, prompts, max_new_tokens=max_new_tokens, **sampling)


# ------------------------------------------------------------------------------------------------ ground

def answer_inputs(tokenizer, image_grid_thw, question, answer):
    """The grounding forward's sample: the chat with `answer` as the assistant turn, every answer token its own
    phrase (mask_ids t on token t), so that one forward yields each token's maps and hidden states and any span's
    maps are the mean of its tokens' (the capture averages a phrase's rows the same way). Also `offsets`: the
    (start, end) characters of each answer token in `answer`."""
    ids, mm = qwen_inputs.prompt_ids(tokenizer, image_grid_thw, question)
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    if not enc["input_ids"]:
        raise ValueError(f"the answer {answer!r} has no tokens to ground")
    n = len(enc["input_ids"])
    return dict(input_ids=torch.cat([ids, torch.tensor(enc["input_ids"])]), mm_token_type_ids=F.pad(mm, (0, n)),
                mask_ids=torch.cat([torch.full((len(ids),), -1), torch.arange(n)]),
                offsets=[tuple(o) for o in enc["offset_mapping"]])


def find_phrases(answer, phrases, offsets):
    """Phrases chosen by hand -> their token spans in the answer (first occurrence not taken by an earlier phrase).
    A phrase that does not occur, or that starts or ends inside a token, is a ValueError naming it."""
    spans, taken = [], []
    for phrase in phrases:
        start = 0
        while True:
            a = answer.find(phrase, start)
            if a < 0:
                raise ValueError(f"--phrases: {phrase!r} does not occur in the answer {answer!r}" +
                                 (" (again: every listed phrase takes its own occurrence)" if start else ""))
            b = a + len(phrase)
            if not any(a < y and x < b for x, y in taken):
                break
            start = a + 1
        toks = [t for t, (x, y) in enumerate(offsets) if x < b and a < y]
        if selection.char_spans([(toks[0], toks[-1] + 1)], offsets, answer) != [(a, b)]:
            raise ValueError(f"--phrases: {phrase!r} starts or ends inside a word of the answer {answer!r}")
        spans.append((toks[0], toks[-1] + 1))
        taken.append((a, b))
    return spans


@torch.no_grad()
def ground(qwen, grounder, tokenizer, image_settings, images, questions, answers, phrases=None):
    """One batched forward with each answer as the assistant turn -> per sample dict(spans=[(start, end) characters
    of the answer], masks=[bool (H, W) at the image's size]), one per grounded phrase.
    phrases: per sample a list of phrases of its answer (find_phrases), or None for the grounder's selector."""
    grounder = getattr(grounder, "module", grounder)
    if phrases is None and grounder.selector is None:
        raise ValueError("this checkpoint has no phrase selector (config `selector`): give the phrases to ground")
    samples = []
    for i, (image, question, answer) in enumerate(zip(images, questions, answers, strict=True)):
        pixel_values, grid = qwen_inputs.patchify(image, **image_settings)
        samples.append(dict(answer_inputs(tokenizer, grid, question, answer), pixel_values=pixel_values,
                            image_grid_thw=grid, image_id=i,
                            **(refiner.sam_image(image, **build.sam_settings(grounder)) if grounder.refiner else {})))
    batch = model.to_device(qwen_inputs.collate(samples), qwen.device)
    frozen = build.extract(qwen, grounder, batch)  # per answer token: maps, hidden (refiner), answer (selector)
    if phrases is None:
        token_spans = [selection.decode(x) for x in grounder.selector(frozen["answer"])]
    else:
        token_spans = [find_phrases(a, p, s["offsets"]) for a, p, s in zip(answers, phrases, samples, strict=True)]
    first = np.cumsum([0] + [len(s["offsets"]) for s in samples])  # each sample's first token in frozen's lists
    index = [(b, range(first[b] + s, first[b] + e)) for b, spans in enumerate(token_spans) for s, e in spans]
    out = [dict(spans=selection.char_spans(spans, s["offsets"], a), masks=[])
           for spans, s, a in zip(token_spans, samples, answers, strict=True)]
    if not index:
        return out
    phrase_frozen = dict(frozen, phrase_image=[b for b, _ in index],
                         maps=[torch.stack([frozen["maps"][t] for t in toks]).mean(0) for _, toks in index],
                         hidden=None if frozen["hidden"] is None else [
                             torch.cat([frozen["hidden"][t] for t in toks]) for _, toks in index])
    logits = grounder(phrase_frozen)
    logits = logits["refined" if "refined" in logits else "coarse"]
    for (b, _), x in zip(index, logits, strict=True):
        size = (images[b].height, images[b].width)
        out[b]["masks"].append(F.interpolate(x[None, None].float(), size=size, mode="bilinear",
                                             align_corners=False)[0, 0].cpu() > 0)
    return out


# ------------------------------------------------------------------------------------------------ show

def marked(answer, spans):
    """The answer with each grounded phrase in brackets and numbered: 'a [red circle](1) and ...'."""
    out, at = [], 0
    for k, (a, b) in sorted(enumerate(spans), key=lambda x: x[1]):
        out += [answer[at:a], f"[{answer[a:b]}]({k + 1})"]
        at = b
    return "".join(out + [answer[at:]])


# ------------------------------------------------------------------------------------------------ ReasonSeg

@torch.no_grad()
def reasonseg(qwen, grounder, tokenizer, image_settings, records, batch_size=8, cot_tokens=8):
    """ReasonSeg records (data.load_reasonseg; LISA's protocol: the first query of each image) -> per mode ("direct":
    the query grounded as the answer; "cot": the VLM first names the answering object in at most cot_tokens tokens,
    that answer grounded) a list of (intersection, union) per image, ignore regions excluded. This rank's share of
    the records (r, r + world, ...); the caller gathers."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, stats = records[rank::world], {"direct": [], "cot": []}
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        images = [data.open_reasonseg(r) for r in part]
        queries = [r["texts"][0] for r in part]
        truth = [data.reasonseg_masks(r) for r in part]
        direct = ground(qwen, grounder, tokenizer, image_settings, images, [qwen_inputs.DEFAULT_PROMPT] * len(part),
                        queries, [[q] for q in queries])
        questions = [COT_PROMPT.format(question=q) for q in queries]
        answers = generate(qwen, tokenizer, images, questions, image_settings, max_new_tokens=cot_tokens)
        named = [i for i, a in enumerate(answers) if a.strip()]  # an empty answer grounds nothing: an empty mask
        cot = [dict(masks=[]) for _ in part]
        for i, res in zip(named, ground(qwen, grounder, tokenizer, image_settings, [images[i] for i in named],
                                        [questions[i] for i in named], [answers[i] for i in named],
                                        [[answers[i].strip()] for i in named]) if named else []):
            cot[i] = res
        for mode, results in (("direct", direct), ("cot", cot)):
            for res, (target, ignore), image in zip(results, truth, images, strict=True):
                pred = res["masks"][0].numpy() if res["masks"] else np.zeros((image.height, image.width), bool)
                stats[mode].append(scoring.reasonseg_stats(pred, target, ignore))
    return stats


# ------------------------------------------------------------------------------------------------ command line

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt, an export.py directory or a Hub id holding one")
    parser.add_argument("--image", help="the picture to talk about")
    parser.add_argument("--ask", help="the question; the VLM answers it, then the answer's phrases are grounded")
    parser.add_argument("--answer", help="use this answer instead of generating one (grounds a text you have)")
    parser.add_argument("--phrases", help="comma-separated phrases of the answer to ground (default: the selector)")
    parser.add_argument("--text", help="ground this text itself (eval.py --image --text behaviour), no chat")
    parser.add_argument("--out", help="the picture (default: beside the checkpoint); with --reasonseg: metrics JSON")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (transformers' default without)")
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--seed", type=int, default=0, help="for --do_sample")
    parser.add_argument("--reasonseg", help="a ReasonSeg split folder (.jpg + .json): report gIoU / cIoU, direct and "
                                            "visual chain-of-thought")
    parser.add_argument("--batch_size", type=int, default=8, help="--reasonseg: images per forward")
    parser.add_argument("--cot_tokens", type=int, default=8, help="--reasonseg: longest chain-of-thought answer")
    args = parser.parse_args()
    # everything that can be checked without the model, before it loads
    ckpt = build.load_checkpoint(args.ckpt)
    records = None
    if args.reasonseg:
        records = data.load_reasonseg(args.reasonseg)
    else:
        empty = [f"--{k}" for k in ("ask", "answer", "text") if getattr(args, k) is not None and not getattr(args, k).strip()]
        if empty:
            raise SystemExit(f"{', '.join(empty)}: empty; give the question, answer or text itself")
        if not args.image or not (args.ask or args.text or args.answer):
            raise SystemExit("give --image with --ask (chat), --answer (a given answer) or --text (ground a text)")
        if args.text is not None and (args.ask or args.answer or args.phrases):
            raise SystemExit("--text grounds the text itself: it takes no --ask, --answer or --phrases")
        image = data.open_image(args.image)
    phrases = [p.strip() for p in args.phrases.split(",") if p.strip()] if args.phrases else None
    if args.phrases is not None and not phrases:
        raise SystemExit(f"--phrases {args.phrases!r}: no phrase in it")
    cfg = build.config_from_dict(ckpt["config"], args.ckpt)

    rank, world, device = build.init_distributed()
    qwen, grounder, tokenizer, _ = build.load_run(args.ckpt, device)
    settings = build.image_settings(cfg, tokenizer)
    if records is not None:
        stats = reasonseg(qwen, grounder, tokenizer, settings, records, args.batch_size, args.cot_tokens)
        if dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, stats)
            stats = {mode: [s for part in gathered for s in part[mode]] for mode in stats}
        if rank == 0:
            results = {f"{os.path.basename(os.path.normpath(args.reasonseg))} ({mode})": scoring.reasonseg_metrics(s)
                       for mode, s in stats.items()}
            print(f"{args.ckpt} | ReasonSeg {args.reasonseg}: first query per image (LISA), ignore regions excluded")
            print(f"{'split (mode)':<24} {'gIoU':>7} {'cIoU':>7} {'n':>5}")
            for name, m in results.items():
                print(f"{name:<24} {m['gIoU']:>7.2f} {m['cIoU']:>7.2f} {m['n']:>5d}")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(dict(ckpt=args.ckpt, results=results), f, indent=1)
        if world > 1:
            dist.destroy_process_group()
        return
    if args.text is not None:
        question, answer, phrases = qwen_inputs.DEFAULT_PROMPT, args.text, [args.text]
    else:
        question = args.ask or qwen_inputs.DEFAULT_PROMPT
        answer = args.answer
        if answer is None:
            torch.manual_seed(args.seed)
            sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
            (answer,) = generate(qwen, tokenizer, [image], [question], settings, max_new_tokens=args.max_new_tokens,
                                 do_sample=args.do_sample, **sampling)
    if not answer.strip():
        raise SystemExit(f"the answer is empty: nothing to ground (question {question!r})")
    if phrases is None and grounder.selector is None:  # answer first, always; grounding needs the phrases
        print(f"Q: {question}\nA: {answer}")
        print(f"{args.ckpt} has no phrase selector (train one with selector: {{layers: 0}}): to ground phrases of this "
              f"answer, rerun with --answer {json.dumps(answer)} --phrases \"<phrase>,<phrase>\"")
        return
    try:
        (res,) = ground(qwen, grounder, tokenizer, settings, [image], [question], [answer],
                        None if phrases is None else [phrases])
    except ValueError as e:
        raise SystemExit(str(e))
    grounded = [answer[a:b] for a, b in res["spans"]]
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)) if os.path.exists(args.ckpt)
                                        else os.getcwd(),  # a Hub id: here
                                        f"chat_{os.path.splitext(os.path.basename(args.image))[0]}.png")
    Image.fromarray(draw.phrases_picture(np.asarray(image), [m.numpy() for m in res["masks"]], grounded)).save(out_path)
    print(f"Q: {question}\nA: {marked(answer, res['spans'])}")
    for k, (phrase, m) in enumerate(zip(grounded, res["masks"], strict=True)):
        print(f"  ({k + 1}) {phrase!r}: {int(m.sum())} pixels")
    if not grounded:
        print("  nothing grounded: the selector tagged no phrase of the answer (choose some with --phrases)")
    print(f"picture: {out_path}")


if __name__ == "__main__":
    main()
