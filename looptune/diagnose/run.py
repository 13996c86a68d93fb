"""`diagnose`: why a loop count wins, loop by loop, as refinement gain against offset cost.

LoopCoder-v2 explains its non-monotonic loop effect (R=2 best, R=3 and 4 worse) with per-loop
diagnostics; this computes them for any PLT checkpoint on held-out text. Definitions:

- States. `h_r` is the raw residual stream leaving loop r (`model(ids, loops=R,
  return_hidden=True)`), before any norm: LoopCoder-v2's step sizes (hundreds to a thousand for a
  7B model) are raw residual magnitudes, not normed ones. `h_0` is the token embedding `E`, so loop
  1's step size is `||h_1 - E||`. Every norm is taken on these raw states; `hidden_norm`
  (mean `||h_r||`) is reported beside them for scale.
- Loop 1. Step size and effective rank are defined (against `h_0 = E`). The KL and the marginal
  gain need a distribution decoded from the previous loop, and `head(E)` is not one the model
  ever decodes from, so they start at loop 2. The update cosine at loop r compares
  `h_r - h_{r-1}` with `h_{r-1} - h_{r-2}`; with `h_0 = E` it is defined from loop 2. The offset
  cost exists only at a boundary, so from loop 2 as well.
- Texts. `--set code` is the held-out code corpus (`looptune/data/heldout/`), one text per file;
  or a JSONL file of {"text": ...}. A run takes a seeded random subset of `--limit` texts (16)
  and keeps the first `--max-bytes` (4096) bytes of each, so its cost does not depend on which
  of the corpus's 38-byte to 94-KB files the subset draws.
- Tokens. Texts are scored in strided windows of `min(512, context)` tokens, where the context
  is the one the checkpoint was trained with (`quality.score.trained_context`: scoring longer
  windows would measure length extrapolation), stride half that, as `quality.bpb.score_texts`;
  every metric averages over the scored tokens, each token once. The effective rank uses the
  same seeded sample of up to 4096 of those token states for every loop (float64 SVD, states not
  centred).
- Quality if decoding stopped at loop r. PLT's loop r never reads a later loop, so the states of
  one `loops=R` pass are exactly those of a `loops=r` pass; bits per byte at loop r is the
  cross-entropy of `model.head(h_r)` (checked against `score_texts(loops=r)` in the tests).
  The marginal gain of loop r is `bpb_{r-1} - bpb_r` (positive: loop r helped).
- Offset cost against gain. `Omega_r` is a distance in the residual stream and the gain is in
  bits, so they cannot be compared as they stand. Two ways to measure the offset's effect in bits
  on the same weights were tried on the bundled family and rejected: rerunning loop r with the
  oracle unshifted carry `n(h_{r-1,i})` (the `plt-noshift` input for that loop only) costs
  1 to 3 bits per byte (docs/results.md), about as much as no carry at all, as weights
  trained with the shift cannot read any other carry (it measures the distribution shift, not
  the offset); and
  moving the carry a small step toward the unshifted one changes nothing to first order (the
  trained carry sits at a minimum, slope ~0). So the verdict converts Omega into bits at the
  loop's own exchange rate: loop r moved the state by its step `s_r = mean ||h_r - h_{r-1}||` and
  bought `g_r = bpb_{r-1} - bpb_r` bits for it, so a mismatch of `Omega_r` in the same stream is
  worth `cost_r = g_r * Omega_r / s_r` bits (defined when `g_r > 0`). The gain exceeds the cost
  exactly when the step exceeds the offset (`s_r > Omega_r`): the normalisation by `||h||` the
  paper's numbers invite cancels, and what remains is the paper's comparison of two residual
  stream distances, reported in the gain's unit. It is an estimate, not a measurement; the
  measured oracle is available with `oracle=True` (`--oracle`) and reported beside it.
  `Omega_r / mean ||h_{r-1}||` is reported as the paper's descriptive number. Checkpoints run
  without the shift (`plt-noshift`, `sequential`) have no offset: cost 0.
- The rule (the paper's). Loop r >= 2 pays off when the effective rank still rises into it
  (`erank_r > erank_{r-1}`) and its marginal gain exceeds the offset cost's effect
  (`g_r > 0` and `g_r > cost_r`, i.e. `s_r > Omega_r`). Another loop is likely to help when the
  rule holds at the last diagnosed loop. With the bundled family present the verdict sets this
  against the members' measured bits per byte at their own R, on the same texts.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from looptune.diagnose import metrics
from looptune.errors import LooptuneError

MAX_WINDOW = 512
RANK_SAMPLE = 4096
DEFAULT_LIMIT = 16  # texts per run
MAX_BYTES = 4096  # bytes kept of each text (its beginning)
HELDOUT_DIR = Path(__file__).resolve().parent.parent / "data" / "heldout"


@dataclass
class LoopRow:
    loop: int
    trained: bool  # within the checkpoint's trained loop count
    step_size: float  # mean ||h_r - h_{r-1}||, h_0 = E
    hidden_norm: float  # mean ||h_r||
    effective_rank: float
    bits_per_byte: float  # decoding stopped at loop r
    kl_nats: float | None = None  # mean KL(p_r || p_{r-1}), from loop 2
    update_cosine: float | None = None  # mean cos(h_r - h_{r-1}, h_{r-1} - h_{r-2}), from loop 2
    offset_cost: float | None = None  # Omega_r = mean ||h_{r-1,i} - h_{r-1,i-1}||
    offset_cost_relative: float | None = None  # Omega_r / mean ||h_{r-1}||
    gain_bits_per_byte: float | None = None  # bpb_{r-1} - bpb_r
    offset_cost_bits_per_byte: float | None = None  # gain * Omega / step (estimate; gain > 0)
    bits_per_byte_unshifted: float | None = None  # oracle: loop r fed n(h_{r-1}) unshifted
    unshifted_cost_bits_per_byte: float | None = None  # oracle: bpb_r - bpb_r(unshifted)
    rule_holds: bool | None = None  # rank rising into r, gain > 0 and gain > cost


@dataclass
class FamilyRow:
    path: str
    loops: int  # the member's own R
    bits_per_byte: float
    context: int  # window tokens: min(512, the member's trained context); stride half that


@dataclass
class Verdict:
    another_loop_helps: bool | None  # None: not decidable from the diagnosed loops
    best_loop: int  # lowest bits per byte among the diagnosed loops
    rule_loop: int  # last loop r such that the rule holds at every loop 2..r (1 if none)
    family_best_loops: int | None
    family_agrees: bool | None
    text: str


@dataclass
class Diagnosis:
    checkpoint: str
    content_hash: str
    trained_loops: int
    loops: int
    mode: str
    window: int
    set_name: str
    texts: int
    max_bytes: int | None  # each text cut to its first max_bytes bytes
    tokens: int
    bytes: int
    context: int
    stride: int
    rank_sample: int
    embedding_effective_rank: float
    device: str
    dtype: str
    torch_version: str
    rows: list[LoopRow]
    family: list[FamilyRow] = field(default_factory=list)
    verdict: Verdict | None = None
    items: list[str] = field(default_factory=list)  # names of the texts used

    def to_dict(self) -> dict:
        return asdict(self)


# ----- texts -----

def load_texts(set_name: str, limit: int | None = DEFAULT_LIMIT, seed: int = 0,
               max_bytes: int | None = MAX_BYTES) -> tuple[list[str], list[str]]:
    """`(names, texts)`. `code`: the held-out code corpus, one text per file; otherwise a JSONL
    path of {"text": ...} lines. With `limit`, a seeded random subset of that many texts, kept in
    corpus order; with `max_bytes`, each text cut to its first that many UTF-8 bytes (whole
    characters), so the cost of a run stays predictable whatever files the subset draws."""
    if set_name == "code":
        items = _heldout_code()
    else:
        items = _jsonl_texts(Path(set_name))
    if limit is not None and limit < 1:
        raise LooptuneError(f"--limit must be at least 1, got {limit}")
    if max_bytes is not None and max_bytes < 1:
        raise LooptuneError(f"--max-bytes must be at least 1, got {max_bytes}")
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    if max_bytes is not None:
        items = [(name, text.encode()[:max_bytes].decode(errors="ignore")) for name, text in items]
    return [name for name, _ in items], [text for _, text in items]


def _heldout_code() -> list[tuple[str, str]]:
    try:
        from looptune.train.corpus import heldout_texts
    except ImportError:  # the corpus reader is not installed: read the directory
        files = sorted([*HELDOUT_DIR.glob("**/*.py"), *HELDOUT_DIR.glob("**/*.py.txt")])
        items = [(str(f.relative_to(HELDOUT_DIR)).removesuffix(".txt"),
                  f.read_text(encoding="utf-8", errors="replace")) for f in files]
    else:
        items = list(heldout_texts())
    items = [(name, text) for name, text in items if text]
    if not items:
        raise LooptuneError(f"the held-out code corpus is empty ({HELDOUT_DIR} has no .py files); "
                            "pass --set with a JSONL file of {\"text\": ...} lines")
    return items


def _jsonl_texts(path: Path) -> list[tuple[str, str]]:
    import json

    if not path.is_file():
        raise LooptuneError(f"--set must be 'code' or a JSONL file; {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LooptuneError(f"{path}:{n}: expected a JSON object with a \"text\" "
                                "field") from None
        if not isinstance(text, str):
            raise LooptuneError(f"{path}:{n}: \"text\" must be a string")
        if text:
            items.append((f"{path.name}:{n}", text))
    if not items:
        raise LooptuneError(f"{path}: no texts")
    return items


# ----- one loop with a chosen carry -----

def loop1_kv(model, ids):
    """Loop 1's keys and values of every layer (the G-SWA global branch), from a loop-1 pass."""
    h, kvs = model.model.embed_tokens(ids), []
    cos, sin, mask = _positional(model, ids.shape[1], h.dtype, ids.device)
    for layer in model.model.layers:
        h, kv = layer.forward_seq(h, cos, sin, 0, False, None, mask)
        kvs.append(kv)
    return kvs


def loop_with_carry(model, ids, h_prev, kvs, shift: bool):
    """Loop r's output given loop r-1's state `h_prev` `[B, T, d]`: carry `n(h_prev)` shifted
    one token right (CLP, `shift=True`, what the model runs) or at its own position (the
    oracle). G-SWA against loop 1's `kvs`, exactly as `PLTForCausalLM.forward` runs loops >= 2."""
    emb = model.model.embed_tokens(ids)
    carry = model.carried(h_prev)
    if shift:
        carry = F.pad(carry[:, :-1], (0, 0, 1, 0))
    h = model.loop_input(emb, carry)
    cos, sin, mask = _positional(model, ids.shape[1], h.dtype, ids.device)
    for layer, kv in zip(model.model.layers, kvs):
        h, _ = layer.forward_seq(h, cos, sin, 1, True, kv, mask)
    return h


def _positional(model, T, dtype, device):
    W = model.knobs()[2]
    cos, sin = model._rope(torch.arange(T, device=device), dtype)
    i = torch.arange(T, device=device)
    return cos, sin, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W)


# ----- the pass -----

class _Sum:
    """Running token-weighted sums per loop."""

    def __init__(self, loops):
        self.v = [0.0] * (loops + 1)
        self.n = [0] * (loops + 1)

    def add(self, r, mean, count):
        self.v[r] += mean * count
        self.n[r] += count

    def mean(self, r):
        return self.v[r] / self.n[r] if self.n[r] else None


@torch.no_grad()
def measure_loops(model, tokenizer, texts, loops, context, stride, batch_size=8,
                  rank_sample=RANK_SAMPLE, seed=0, oracle=False, progress=None) -> dict:
    """Every per-loop quantity of the module docstring over the scored tokens of `texts`; with
    `oracle`, also loop r rerun with the unshifted carry (R - 1 more loops of compute)."""
    from looptune.quality.bpb import windows

    R = loops
    shifted = model.knobs()[1] == "plt"
    oracle = oracle and shifted
    device = model.model.embed_tokens.weight.device
    bos = getattr(tokenizer, "bos_id", None)
    encoded = [([bos] if bos is not None else []) + tokenizer.encode(t) for t in texts]
    jobs = sorted(((i, s, e, f) for i, ids in enumerate(encoded)
                   for s, e, f in windows(len(ids), context, stride)), key=lambda j: j[2] - j[1])
    if not jobs:
        raise LooptuneError("the texts are too short to score (need at least two tokens)")
    chunks, cur = [], []
    for job in jobs:  # equal-length windows batched together
        if cur and (len(cur) == batch_size or cur[-1][2] - cur[-1][1] != job[2] - job[1]):
            chunks.append(cur)
            cur = []
        cur.append(job)
    chunks.append(cur)

    n_total = sum(e - f for _, _, e, f in jobs)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n_total, generator=gen)[:min(rank_sample, n_total)].sort().values
    rank_states = torch.zeros(R + 1, len(sample), model.config.hidden_size)  # [R+1, S, d] CPU
    step, norm, kl, cosine, omega = (_Sum(R) for _ in range(5))
    bits, bits_un = [0.0] * (R + 1), [0.0] * (R + 1)
    nbytes, offset = 0, 0
    for chunk in chunks:
        ids = torch.tensor([encoded[i][s:e] for i, s, e, _ in chunk], device=device)  # [B, L]
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)  # scored states
        for row, (i, s, e, f) in enumerate(chunk):
            mask[row, f - s - 1:e - s - 1] = True  # the state at p predicts token p + 1
            nbytes += sum(len(tokenizer.token_bytes(t)) for t in encoded[i][f:e])
        pairs = mask[:, 1:]  # (p - 1, p) with p scored, p >= 1
        targets = ids.roll(-1, dims=1)[mask]
        n = int(mask.sum())
        _, hidden = model(ids, loops=R, return_hidden=True)
        states = [model.model.embed_tokens(ids)] + hidden  # states[r] = h_r, h_0 = E
        here = (sample >= offset) & (sample < offset + n)  # sampled tokens in this chunk
        for r in range(R + 1):
            rank_states[r, here] = states[r][mask][(sample[here] - offset).to(device)].float().cpu()
        offset += n
        kvs = loop1_kv(model, ids) if oracle and R > 1 else None
        logits_prev = None
        for r in range(1, R + 1):
            h, h_prev = states[r][mask], states[r - 1][mask]
            step.add(r, metrics.step_size(h, h_prev), n)
            norm.add(r, metrics.mean_norm(h), n)
            logits = model.head(h).float()  # [n, V]
            bits[r] += F.cross_entropy(logits, targets, reduction="sum").item() / math.log(2)
            if r >= 2:
                kl.add(r, metrics.kl_between(logits, logits_prev), n)
                cosine.add(r, metrics.update_cosine(h, h_prev, states[r - 2][mask]), n)
                seq = states[r - 1]
                seq_pairs = torch.stack((seq[:, :-1][pairs], seq[:, 1:][pairs]), dim=1)  # [P, 2, d]
                if len(seq_pairs):
                    omega.add(r, metrics.offset_cost(seq_pairs), len(seq_pairs))
                if oracle:
                    h_un = loop_with_carry(model, ids, seq, kvs, shift=False)[mask]
                    nll = F.cross_entropy(model.head(h_un).float(), targets, reduction="sum")
                    bits_un[r] += nll.item() / math.log(2)
            logits_prev = logits
        if progress:
            progress(len(chunk))

    bpb = [b / nbytes for b in bits]
    rows = []
    for r in range(1, R + 1):
        row = dict(loop=r, step_size=step.mean(r), hidden_norm=norm.mean(r),
                   effective_rank=metrics.effective_rank(rank_states[r]), bits_per_byte=bpb[r])
        if r >= 2:
            om, gain = omega.mean(r), bpb[r - 1] - bpb[r]
            if not shifted:
                cost = 0.0  # no shift, no offset
            elif om is None or gain <= 0:
                cost = None
            else:
                cost = gain * om / max(step.mean(r), 1e-12)
            row.update(kl_nats=kl.mean(r), update_cosine=cosine.mean(r), offset_cost=om,
                       offset_cost_relative=None if om is None else om / norm.mean(r - 1),
                       gain_bits_per_byte=gain, offset_cost_bits_per_byte=cost)
            if oracle:
                un = bits_un[r] / nbytes
                row.update(bits_per_byte_unshifted=un, unshifted_cost_bits_per_byte=bpb[r] - un)
        rows.append(row)
    return {"rows": rows, "embedding_effective_rank": metrics.effective_rank(rank_states[0]),
            "tokens": n_total, "bytes": nbytes, "rank_sample": len(sample), "windows": len(jobs)}


# ----- the family at their own R -----

def family_scores(texts, device="auto", dtype="auto", progress=None):
    """Bits per byte of each bundled member at its own R on `texts` (cached on disk), in windows
    of min(512, its trained context)."""
    from looptune.bundled import family_members
    from looptune.model import content_hash, load_model
    from looptune.quality.bpb import bits_per_byte, score_texts
    from looptune.quality.score import trained_context
    from looptune.store import ResultCache

    cache = ResultCache("diagnose-family")
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    out = []
    for path in family_members():
        model, tok = load_model(path, device, dtype)
        context = min(MAX_WINDOW, trained_context(path, model.config))
        stride = max(context // 2, 1)
        key = {"model": content_hash(path), "texts": digest, "context": context, "stride": stride,
               "dtype": str(next(model.parameters()).dtype), "bpb": 1}
        hit = cache.get(key)
        if hit is None:
            hit = bits_per_byte(score_texts(model, tok, texts, context=context, stride=stride))
            cache.put(key, hit)
        out.append(FamilyRow(str(path), model.config.num_loops, hit, context))
        if progress:
            progress(path)
    return out


# ----- the verdict -----

def _rule(prev: LoopRow, row: LoopRow) -> bool:
    gain, cost = row.gain_bits_per_byte, row.offset_cost_bits_per_byte
    return row.effective_rank > prev.effective_rank and gain > 0 and gain > (cost or 0.0)


def apply_rule(rows: list[LoopRow]) -> None:
    """Set `rule_holds` on every row from loop 2: rank rising into r, gain > 0 and > cost."""
    for prev, row in zip([None] + rows[:-1], rows):
        if prev is None:
            continue
        row.rule_holds = _rule(prev, row)


def verdict(rows: list[LoopRow], embedding_rank: float, family: list[FamilyRow] | None = None,
            trained_loops: int | None = None) -> Verdict:
    """The plain-words verdict: is another loop likely to help, and does the family agree?"""
    apply_rule(rows)
    R = len(rows)
    best = min(rows, key=lambda x: x.bits_per_byte)
    rule_loop = 1
    for row in rows[1:]:
        if not row.rule_holds:
            break
        rule_loop = row.loop
    words = []
    last = rows[-1]
    if R == 1:
        helps = None
        rises = "rises" if rows[0].effective_rank > embedding_rank else "does not rise"
        words.append(f"With one loop there is no gain or offset cost to judge another loop by "
                     f"(the effective rank {rises} from the embeddings' {embedding_rank:.2f} to "
                     f"{rows[0].effective_rank:.2f}); run with --loops 2 to see what an untrained "
                     f"second loop does.")
    else:
        prev_rank = rows[-2].effective_rank
        rising = last.effective_rank > prev_rank
        helps = _rule(rows[-2], last)
        rank_words = (f"the effective rank {'still rises' if rising else 'no longer rises'} into "
                      f"loop {R} ({prev_rank:.2f} -> {last.effective_rank:.2f})")
        gain, cost = last.gain_bits_per_byte, last.offset_cost_bits_per_byte
        if gain <= 0:
            gain_words = f"loop {R} did not improve on loop {R - 1} ({_b(gain)})"
        elif cost is None or cost == 0:
            gain_words = f"loop {R} gains {_b(gain)} with no offset to pay"
        else:
            gain_words = (f"loop {R}'s gain of {_b(gain)} "
                          f"{'exceeds' if gain > cost else 'does not exceed'} its offset cost of "
                          f"{_b(cost)} (a step of {last.step_size:.3g} against an offset of "
                          f"{last.offset_cost:.3g} in the residual stream)")
        words.append(f"Another loop is {'likely' if helps else 'unlikely'} to help: {rank_words}, "
                     f"and {gain_words}.")
        through = (f"the rule holds at every loop through {rule_loop}" if rule_loop > 1
                   else "the rule already fails at loop 2")
        words.append(f"Stopping early, decoding is best at loop {best.loop} "
                     f"({best.bits_per_byte:.3f} bits/byte); {through}.")
    if trained_loops is not None and R > trained_loops:
        words.append(f"Loops beyond {trained_loops} were never trained in this checkpoint.")
    fam_best, agrees = None, None
    if family:
        by_r = {m.loops: m for m in family}
        top = min(family, key=lambda m: m.bits_per_byte)
        fam_best = top.loops
        scores = ", ".join(f"R={m.loops} {m.bits_per_byte:.3f}" for m in
                           sorted(family, key=lambda m: m.loops))
        words.append(f"The bundled family, each member at its own R, scores {scores} bits/byte: "
                     f"R={top.loops} is best.")
        if helps is not None and R in by_r and R + 1 in by_r:
            family_helps = by_r[R + 1].bits_per_byte < by_r[R].bits_per_byte
            agrees = helps == family_helps
            words.append(f"Training one more loop {'helped' if family_helps else 'did not help'} "
                         f"(R={R + 1}: {by_r[R + 1].bits_per_byte:.3f} vs R={R}: "
                         f"{by_r[R].bits_per_byte:.3f}), so the diagnosis "
                         f"{'agrees' if agrees else 'disagrees'}.")
        elif helps is not None:
            words.append(f"The family has no member at R={R} and R={R + 1} to check the "
                         "prediction against.")
        if R > 1:
            words.append(f"The rule's loop count ({rule_loop}) "
                         f"{'matches' if rule_loop == fam_best else 'differs from'} the family's "
                         f"best R ({fam_best}).")
    return Verdict(helps, best.loop, rule_loop, fam_best, agrees, " ".join(words))


def _b(x: float) -> str:
    return f"{x:+.4f} bits/byte"


# ----- the library entry point -----

def diagnose(checkpoint=None, loops: int | None = None, set_name: str = "code",
             limit: int | None = DEFAULT_LIMIT, seed: int = 0, device="auto", dtype="auto",
             family: bool = True, max_bytes: int | None = MAX_BYTES, oracle: bool = False,
             batch_size: int = 8, progress=None) -> Diagnosis:
    """Per-loop diagnostics of `checkpoint` (default: the bundled model) on held-out texts, with
    the verdict. `dtype="auto"` is float32 on a CPU and the stored dtype elsewhere.
    `progress(kind, n)` is called with ("windows", total) once, then ("window", k) as windows
    finish and ("member", path) per scored family member."""
    from looptune.bundled import resolve_checkpoints
    from looptune.model import content_hash, load_model
    from looptune.model.checkpoint import resolve_device, run_dtype
    from looptune.quality.score import trained_context

    path = resolve_checkpoints([checkpoint] if checkpoint else None)[0]
    dtype = run_dtype(dtype, resolve_device(device))  # norms, KL and SVD want float32 on a CPU
    model, tokenizer = load_model(path, device, dtype)
    if tokenizer is None:
        raise LooptuneError(f"{path} has no tokenizer; diagnose needs one to read text")
    cfg = model.config
    R = cfg.num_loops if loops is None else loops
    if R < 1:
        raise LooptuneError(f"--loops must be at least 1, got {R}")
    names, texts = load_texts(set_name, limit, seed, max_bytes)
    context = min(MAX_WINDOW, trained_context(path, cfg))
    stride = max(context // 2, 1)
    if progress:
        from looptune.quality.bpb import windows
        bos = 1 if getattr(tokenizer, "bos_id", None) is not None else 0
        progress("windows", sum(len(windows(len(tokenizer.encode(t)) + bos, context, stride))
                                for t in texts))
    m = measure_loops(model, tokenizer, texts, R, context, stride, batch_size=batch_size,
                      seed=seed, oracle=oracle,
                      progress=(lambda k: progress("window", k)) if progress else None)
    rows = [LoopRow(trained=row["loop"] <= cfg.num_loops, **row) for row in m["rows"]]
    members = []
    if family:
        members = family_scores(texts, device, dtype,
                                progress=(lambda p: progress("member", p)) if progress else None)
    p = next(model.parameters())
    diag = Diagnosis(
        checkpoint=str(path), content_hash=content_hash(path), trained_loops=cfg.num_loops,
        loops=R, mode=model.knobs()[1], window=model.knobs()[2], set_name=str(set_name),
        texts=len(texts), max_bytes=max_bytes, tokens=m["tokens"], bytes=m["bytes"],
        context=context, stride=stride,
        rank_sample=m["rank_sample"], embedding_effective_rank=m["embedding_effective_rank"],
        device=str(p.device), dtype=str(p.dtype).removeprefix("torch."),
        torch_version=torch.__version__, rows=rows, family=members, items=names)
    diag.verdict = verdict(rows, diag.embedding_effective_rank, members, cfg.num_loops)
    return diag
