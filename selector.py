"""The learned phrase selector: which spans of an answer to ground (F-LMM's keyword selector, which it never released).

A small token classifier on the frozen VLM's hidden states of the answer tokens (model.frozen_outputs(...,
answer_layers=n), the same forward that yields the attention maps): the last n layers mixed with learned softmax
weights, a linear projection, one 1-D convolution over the tokens (so a tag sees the tokens on both sides, which a
causal LM's states do not), then B/I/O tags. Spans come out as token ranges [start, end) of the answer and are mapped
back to character ranges of the answer text with the tokenizer's offsets (`char_spans`).

Supervision (`token_tags`): the tokens of a supervised phrase are B (its first) and I (the rest); every other answer
token (separators, phrases without a mask such as PNG's non-grounded utterances, synthetic filler) is O.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

O, B, I = 0, 1, 2  # tags


class Selector(nn.Module):
    """Hidden states of answer tokens -> per-token B/I/O logits.

    forward(answer): a list of (A_b, layers, hidden_size) tensors, one per sequence -> a list of (A_b, 3) float32
    logits. Sequences run padded in one batch; padded slots are zeroed before the convolution, so that a sequence's
    tags do not depend on the others in its batch."""

    def __init__(self, *, hidden_size, layers, width=128, kernel=5):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(layers))  # softmax-mixed, as the refiner mixes its layers
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, width)
        self.context = nn.Conv1d(width, width, kernel, padding=kernel // 2)
        self.out = nn.Linear(width, 3)

    def forward(self, answer):
        lengths = [len(a) for a in answer]
        x = nn.utils.rnn.pad_sequence(answer, batch_first=True).float()  # (B, A, n, C)
        valid = (torch.arange(x.shape[1], device=x.device) < torch.tensor(lengths, device=x.device)[:, None])[..., None]
        x = (x * self.layer_weights.softmax(0)[:, None]).sum(2)  # (B, A, C)
        x = F.gelu(self.proj(self.norm(x))) * valid  # (B, A, width), padding zero
        x = x + F.gelu(self.context(x.transpose(1, 2))).transpose(1, 2)  # (B, A, width)
        logits = self.out(x)  # (B, A, 3)
        return [logits[b, :n] for b, n in enumerate(lengths)]


def answer_mask_ids(mask_ids):
    """One sequence's mask_ids (S,) -> its answer's part (A,): the first through the last phrase token, the tokens
    frozen_outputs(answer_layers=...) returns."""
    where = (mask_ids >= 0).nonzero().flatten()
    return mask_ids[int(where[0]):int(where[-1]) + 1]


def token_tags(mask_ids, supervised):
    """mask_ids of one answer (A,) (phrase k on its tokens, -1 elsewhere) + the supervised flag of each phrase ->
    (A,) int64 tags: B on a supervised phrase's first token, I on its others, O everywhere else."""
    tags = torch.full(mask_ids.shape, O, dtype=torch.int64)
    for k, ok in enumerate(supervised):
        where = (mask_ids == k).nonzero().flatten()
        if ok and len(where):
            tags[where] = I
            tags[where[0]] = B
    return tags


def tag_spans(tags):
    """(A,) tags -> token spans [(start, end)], end exclusive: B starts a span, I continues it (an I after O starts
    one too), O ends it."""
    spans, start = [], None
    for i, t in enumerate(list(tags) + [O]):
        t = int(t)
        if start is not None and t != I:
            spans.append((start, i))
            start = None
        if t == B or (t == I and start is None):
            start = i
    return spans


def decode(logits):
    """(A, 3) logits -> predicted token spans (tag_spans of the argmax)."""
    return tag_spans(logits.argmax(-1).tolist())


def sequence_losses(logits, tags):
    """Lists of (A_b, 3) logits and (A_b,) tags -> (B,) mean token cross-entropy per sequence (unit "sequence")."""
    return torch.stack([F.cross_entropy(x.float(), t.to(x.device)) for x, t in zip(logits, tags, strict=True)])


def span_counts(pred, gold):
    """Exact-match span counts (true positives, predicted, gold) of two lists of (start, end)."""
    return len(set(pred) & set(gold)), len(pred), len(gold)


def span_scores(tp, n_pred, n_gold):
    """Span precision, recall, F1 in percent from summed counts."""
    p, r = 100 * tp / max(n_pred, 1), 100 * tp / max(n_gold, 1)
    return dict(span_P=p, span_R=r, span_F1=2 * p * r / max(p + r, 1e-12))


def char_spans(token_spans, offsets, text):
    """Token spans of an answer -> character spans [(start, end)] of `text`: from the first token's first character
    to the last token's last, without the leading whitespace a BPE token fuses into a word (" circle").
    offsets: (start, end) characters of each answer token in `text` (the tokenizer's offset_mapping)."""
    out = []
    for s, e in token_spans:
        a, b = offsets[s][0], offsets[e - 1][1]
        a += len(text[a:b]) - len(text[a:b].lstrip())
        b -= len(text[a:b]) - len(text[a:b].rstrip())
        if a < b:
            out.append((a, b))
    return out
