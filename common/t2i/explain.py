"""Token-wise significance: which prompt tokens drive memorization (Wen et al. 2024, Sec. 4).

For prompt p, G generations and a target DDIM step t, L_p = mean_g ‖ε(x_t, e_p) − ε(x_t, ∅)‖₂ and token k's
significance is ‖∂L_p/∂e_{p,k}‖₂ over the embedding channels, averaged over the target steps. e is the
*conditional* text-encoder output (``prompt_embeds``) or, optionally, the token embeddings that enter the
text encoder. The unconditional embedding and the trajectory leading to x_t are constants.

The reference notebook differentiates the unconditional row (its rows are swapped), which gives every prompt
the same profile; here the gradient flows only through ε(x_t, e_p). All prompts of a batch share one forward
and one backward per target step: L_p depends only on e_p (the UNet normalises per sample), so the gradient
of Σ_p L_p with respect to e_p is ∂L_p/∂e_p.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass

import torch

from diffmem.common.t2i.detection import iter_text_noise_objective
from diffmem.common.t2i.options import WRT_CHOICES
from diffmem.common.t2i.pipelines import Conditioning, DenoiserParts, FamilyError, TextSegment
from diffmem.common.t2i.text_noise import initial_latents
from diffmem.common.t2i.tokenizer import bytes_to_unicode

# fp16 gradients through a UNet can underflow; a fixed power-of-two scale on L is exact and undone after.
FP16_GRAD_SCALE = 2.0**12


# ---------------------------------------------------------------------------------------------------------
# The math, as pure functions
# ---------------------------------------------------------------------------------------------------------

def generation_mean_objective(text_norms: torch.Tensor) -> torch.Tensor:
    """L = mean over generations of ‖ε(x_t, c) − ε(x_t, ∅)‖₂: [B, G, ...] -> [B, ...] (Wen et al. 2024, Sec. 4)."""
    return text_norms.float().mean(dim=1)


def token_significance(step_grads: torch.Tensor) -> torch.Tensor:
    """‖∂L/∂e_k‖₂ over channels, averaged over target steps: [T, B, L, D] -> [B, L] (Wen et al. 2024, Sec. 4)."""
    return step_grads.float().norm(dim=-1).mean(dim=0)


def normalize_scores(scores: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Scores over the largest score among the prompt's own tokens (content mask), so that token gets 1.

    BOS/EOS/padding keep their value on the same scale (it may exceed 1). A prompt without content tokens is
    scaled by its largest score overall. [B, L] -> [B, L].
    """
    masked = torch.where(content, scores, torch.zeros_like(scores))
    top = masked.max(dim=-1, keepdim=True).values
    top = torch.where(content.any(dim=-1, keepdim=True), top, scores.max(dim=-1, keepdim=True).values)
    return scores / top.clamp_min(torch.finfo(scores.dtype).tiny)


def token_kinds(input_ids: list[int], attention_mask: list[int], bos_id: int | None, eos_id: int | None) -> list[str]:
    """Role of each position: 'bos', 'token' (the prompt's own), 'eos' or 'pad' (masked-out padding).

    CLIP pads with EOS; the tokenizer's attention mask (1 up to and including the first EOS) tells padding
    from the real EOS whatever the pad token is.
    """
    kinds = []
    for pos, (tid, m) in enumerate(zip(input_ids, attention_mask)):
        if not m:
            kinds.append("pad")
        elif pos == 0 and tid == bos_id:
            kinds.append("bos")
        elif tid == eos_id:
            kinds.append("eos")
        else:
            kinds.append("token")
    return kinds


def display_token(token: str) -> str:
    """A token as text: CLIP BPE's byte-level symbols decoded and its end-of-word marker '</w>' as a trailing space;
    a SentencePiece (T5) piece's word-start marker '▁' as a leading space."""
    if "▁" in token:
        return token.replace("▁", " ")
    word_end = token.endswith("</w>")
    body = token[: -len("</w>")] if word_end else token
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    if all(c in decoder for c in body):
        body = bytes(decoder[c] for c in body).decode("utf-8", errors="replace")
    return body + (" " if word_end else "")


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Tokenized:
    """Padded, truncated ids of a batch of prompts, their attention masks and truncation flags."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L]
    truncated: list[bool]


def tokenize(parts: DenoiserParts, prompts: list[str]) -> Tokenized:
    """Stable Diffusion's tokenization (pad to and truncate at model_max_length), as in encode_prompts."""
    tok = parts.tokenizer
    max_len = tok.model_max_length
    enc = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    full_lengths = [len(x) for x in tok(prompts, truncation=False).input_ids]
    return Tokenized(enc.input_ids, enc.attention_mask, [n > max_len for n in full_lengths])


def _encoder_mask(parts: DenoiserParts, tokens: Tokenized, device) -> torch.Tensor | None:
    # Only SD-2-style encoders configured with use_attention_mask see the mask (as in encode_prompts).
    if getattr(parts.text_encoder.config, "use_attention_mask", False):
        return tokens.attention_mask.to(device)
    return None


def conditioning_leaf(parts: DenoiserParts, tokens: Tokenized, wrt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, prompt_embeds): the fp32 tensor to differentiate with respect to and the UNet conditioning.

    ``prompt_embeds``: the leaf is the text encoder's output itself. ``token_embeds``: the leaf is the token
    embedding lookup; prompt_embeds are computed from it through the text encoder with grad, by substituting
    the leaf for the embedding layer's output (works for any encoder exposing get_input_embeddings).
    """
    if wrt not in WRT_CHOICES:
        raise ValueError(f"unknown wrt {wrt!r}; expected one of {', '.join(WRT_CHOICES)}")
    te = parts.text_encoder
    device = next(te.parameters()).device
    ids = tokens.input_ids.to(device)
    mask = _encoder_mask(parts, tokens, device)
    if wrt == "prompt_embeds":
        with torch.no_grad():
            embeds = te(ids, attention_mask=mask)[0]
        leaf = embeds.float().requires_grad_(True)
        return leaf, leaf
    layer = te.get_input_embeddings()
    with torch.no_grad():
        leaf = layer(ids).float().requires_grad_(True)
    handle = layer.register_forward_hook(lambda module, args, out: leaf.to(out.dtype))
    try:
        embeds = te(ids, attention_mask=mask)[0]
    finally:
        handle.remove()
    return leaf, embeds


def step_gradients(parts: DenoiserParts, leaf: torch.Tensor, prompt_embeds: torch.Tensor | Conditioning,
                   uncond_embed: torch.Tensor, latents: torch.Tensor, *, num_inference_steps: int,
                   target_steps: list[int], guidance_scale: float, pooled_leaf: torch.Tensor | None = None):
    """Yield (step, L [B], ∂L/∂leaf [B, L, D]) at each target step, one backward for the whole batch; with
    ``pooled_leaf`` (a conditioning whose pooled embedding is that leaf), (step, L, (∂L/∂leaf, ∂L/∂pooled)).

    L is the generation-mean text-noise norm (fp32, detached); the gradient is fp32 on the leaf's device.
    Each step's UNet graph is freed by its own backward, so memory does not grow with the number of steps.
    """
    scale = FP16_GRAD_SCALE if parts.dtype == torch.float16 else 1.0
    steps = sorted(set(target_steps))
    sequence = prompt_embeds.embeds if isinstance(prompt_embeds, Conditioning) else prompt_embeds
    wrt = (sequence,) if pooled_leaf is None else (sequence, pooled_leaf)
    for step, norms in iter_text_noise_objective(
            parts, prompt_embeds, uncond_embed, latents, num_inference_steps=num_inference_steps,
            target_steps=steps, guidance_scale=guidance_scale):
        objective = generation_mean_objective(norms)
        # Backward through this step's UNet call only (its buffers are freed) ...
        grads = list(torch.autograd.grad(objective.sum() * scale, wrt))
        if sequence is not leaf:
            # ... then through the text encoder, whose graph every step shares: kept until the last step.
            (grads[0],) = torch.autograd.grad(sequence, leaf, grad_outputs=grads[0], retain_graph=step != steps[-1])
        grads = [g.float() / scale for g in grads]
        if not all(torch.isfinite(g).all() for g in grads):
            raise FloatingPointError(f"non-finite gradient at step {step} in {parts.dtype}; use fp32 or bf16")
        yield step, objective.detach(), (grads[0] if pooled_leaf is None else tuple(grads))


# ---------------------------------------------------------------------------------------------------------
# Per-prompt results
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TokenSignificance:
    """Significance of every position of one prompt (all model_max_length positions, specials included)."""

    row: int
    prompt: str
    tokens: list[str]  # tokenizer.convert_ids_to_tokens
    token_ids: list[int]
    kinds: list[str]  # bos / token / eos / pad, see token_kinds
    scores: list[float]  # ‖∂L/∂e_k‖₂ averaged over target steps
    normalized: list[float]  # scores / max over the prompt's own tokens
    objective: list[float]  # L at each target step
    target_steps: list[int]
    wrt: str
    truncated: bool
    encoder: str = "text_encoder"  # the pipeline attribute of the encoder these tokens went through

    def content(self) -> list[tuple[str, float, float]]:
        """(display text, score, normalized) of the prompt's own tokens, BOS/EOS/padding left out."""
        return [(display_token(t), s, n) for t, s, n, k in zip(self.tokens, self.scores, self.normalized,
                                                               self.kinds) if k == "token"]

    def ranking(self) -> list[tuple[str, float]]:
        """The prompt's own tokens (display text, normalized score), most significant first."""
        return sorted(((t, n) for t, _, n in self.content()), key=lambda x: -x[1])

    def to_json(self) -> dict:
        return asdict(self)


def check_explainable(parts: DenoiserParts, wrt: str) -> list[TextSegment]:
    """The family's encoder segments; one line where ``wrt`` is not defined for it (token_embeds: one encoder)."""
    segments = parts.family.text_segments()
    if wrt == "token_embeds" and len(segments) > 1:
        raise FamilyError(f"--wrt token_embeds differentiates through one text encoder; {parts.family.label} has "
                          f"{len(segments)}: use --wrt prompt_embeds")
    return segments


def explain_prompts(
    parts: DenoiserParts,
    prompts: list[str],
    rows: list[int],
    *,
    num_images_per_prompt: int = 4,
    gen_seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    target_steps: list[int] = (0,),
    wrt: str = "prompt_embeds",
    latents_mode: str = "per_prompt",
    uncond_embed: torch.Tensor | Conditioning | None = None,
    all_encoders: bool = False,
) -> list[TokenSignificance]:
    """Token-wise significance of a batch of prompts; ``rows`` (dataset positions) seed their latents.

    One result per prompt for its family's first encoder; with ``all_encoders``, one per prompt and encoder
    (prompt-major, in the family's encoder order: SDXL's two CLIPs, SD3's CLIP-L, CLIP-G and T5, Flux's T5 and its
    pooled CLIP, PixArt's T5). A pooled encoder's one entry is the norm of the gradient with respect to the pooled
    embedding.
    """

    if len(prompts) != len(rows):
        raise ValueError(f"got {len(prompts)} prompts for {len(rows)} rows")
    if wrt not in WRT_CHOICES:
        raise ValueError(f"unknown wrt {wrt!r}; expected one of {', '.join(WRT_CHOICES)}")
    steps = sorted(set(target_steps))
    if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
        raise ValueError(f"target steps must lie in 0..{num_inference_steps - 1}, got {list(target_steps)}")
    segments = check_explainable(parts, wrt)
    if uncond_embed is None:
        uncond_embed = parts.unconditional()
    latents = initial_latents(rows, num_images_per_prompt, parts.latent_shape, gen_seed, latents_mode,
                              parts.init_noise_sigma(num_inference_steps))
    pooled_leaf = None
    if wrt == "token_embeds":
        tokens = tokenize(parts, prompts)
        leaf, sequence = conditioning_leaf(parts, tokens, wrt)
        cond = Conditioning(sequence)
        truncated = tokens.truncated
    else:
        encoded = parts.encode(prompts)
        truncated = encoded.truncated
        leaf = encoded.embeds.embeds.detach().float().requires_grad_(True)
        if encoded.embeds.pooled is not None:
            pooled_leaf = encoded.embeds.pooled.detach().float().requires_grad_(True)
        cond = encoded.embeds.replace(embeds=leaf, pooled=pooled_leaf)
    wanted = segments if all_encoders else segments[:1]
    per_step = {s: [] for s in range(len(wanted))}
    objectives = []
    for _, objective, grad in step_gradients(
            parts, leaf, cond, uncond_embed.detach(), latents, num_inference_steps=num_inference_steps,
            target_steps=steps, guidance_scale=guidance_scale, pooled_leaf=pooled_leaf):
        grad_seq, grad_pooled = grad if pooled_leaf is not None else (grad, None)
        for k, segment in enumerate(wanted):
            # Reduce to per-token norms at once: [B, L] per step instead of the full [B, L, D] gradient.
            per_step[k].append(segment_significance(segment, grad_seq, grad_pooled).cpu())
        objectives.append(objective.cpu())
    objective = torch.stack(objectives, dim=-1)  # [B, T]
    by_segment = []
    for k, segment in enumerate(wanted):
        scores = torch.stack(per_step[k]).mean(dim=0)  # == token_significance over all steps
        by_segment.append(_segment_results(parts, segment, prompts, rows, scores, objective, steps, wrt, truncated))
    return [r for b in range(len(prompts)) for r in (seg[b] for seg in by_segment)]


def segment_significance(segment: TextSegment, grad_seq: torch.Tensor,
                         grad_pooled: torch.Tensor | None) -> torch.Tensor:
    """One encoder's per-token ‖∂L/∂e_k‖₂ [B, L] from the gradient of the whole conditioning (its rows and
    columns of the sequence; a pooled encoder: its columns of the pooled embedding, one entry [B, 1])."""
    if segment.rows is None:
        grad = grad_pooled[:, slice(*segment.cols)] if segment.cols else grad_pooled
        return token_significance(grad[None, :, None, :])
    grad = grad_seq[:, slice(*segment.rows)]
    if segment.cols is not None:
        grad = grad[..., slice(*segment.cols)]
    return token_significance(grad[None])


def _segment_results(parts, segment: TextSegment, prompts, rows, scores, objective, steps, wrt, truncated):
    tok = getattr(parts.family.pipe, segment.tokenizer, None) or parts.tokenizer
    if segment.rows is None:  # the pooled embedding: one entry, its own scale
        n = len(prompts)
        ids, kinds, names = [[-1]] * n, [["token"]] * n, [["<pooled>"]] * n
        content = torch.ones(n, 1, dtype=torch.bool)
    else:
        enc_ids, enc_mask = parts.family.segment_ids(segment, prompts)
        ids = enc_ids.tolist()
        kinds = [token_kinds(i, m, tok.bos_token_id, tok.eos_token_id) for i, m in zip(ids, enc_mask.tolist())]
        names = [tok.convert_ids_to_tokens(i) for i in ids]
        content = torch.tensor([[k == "token" for k in row] for row in kinds])
    normalized = normalize_scores(scores, content)
    return [TokenSignificance(
        row=row, prompt=prompt, tokens=names[b], token_ids=ids[b], kinds=kinds[b], scores=scores[b].tolist(),
        normalized=normalized[b].tolist(), objective=objective[b].tolist(), target_steps=steps, wrt=wrt,
        truncated=truncated[b], encoder=segment.encoder) for b, (prompt, row) in enumerate(zip(prompts, rows))]


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------

HEATMAP_STYLE = """
.prompt { margin: 0.6em 0 1.2em 0; line-height: 2.1; }
.meta { color: #666; font-size: 0.8em; }
.tok { padding: 0.15em 0.1em; border-radius: 3px; font-family: monospace; font-size: 1.05em; }
"""


def token_spans_html(result: TokenSignificance) -> str:
    """One prompt's own tokens as <span>s shaded red by normalized significance (hover shows the values)."""
    spans = []
    for text, score, norm in result.content():
        alpha = min(max(norm, 0.0), 1.0)
        ink = "#fff" if alpha > 0.6 else "#000"  # keep the text readable on dark shading
        spans.append(f'<span class="tok" style="background: rgba(200, 20, 20, {alpha:.3f}); color: {ink}" '
                     f'title="score {score:.4g}, normalized {norm:.3f}">{html.escape(text.strip())}</span>'
                     + (" " if text.endswith(" ") else ""))
    return "".join(spans)


def heatmap_fragment(results: list[TokenSignificance]) -> str:
    """Each prompt with its tokens shaded by significance (BOS/EOS/padding hidden), as embeddable HTML."""
    blocks = [f"<style>{HEATMAP_STYLE}</style>"]
    for r in results:
        objective = sum(r.objective) / len(r.objective)
        meta = (f"row {r.row} &middot; {html.escape(r.encoder)} &middot; L = {objective:.4g} &middot; wrt {r.wrt} "
                f"&middot; steps "
                f"{','.join(map(str, r.target_steps))}" + (" &middot; truncated" if r.truncated else ""))
        blocks.append(f'<div class="prompt" title="{html.escape(r.prompt)}"><div class="meta">{meta}</div>'
                      f'{token_spans_html(r)}</div>')
    return "\n".join(blocks)


def heatmap_html(results: list[TokenSignificance], title: str = "Token-wise significance") -> str:
    """A standalone HTML page of :func:`heatmap_fragment` under a title."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h2>{html.escape(title)}</h2>\n{heatmap_fragment(results)}\n</body></html>\n")


def plot_token_bars(result: TokenSignificance, path=None, ax=None):
    """Bar chart of the prompt's own tokens' normalized significance; saved as PNG when path is given.

    With a path the figure is drawn off-screen (no pyplot state, any backend); without one it is a pyplot
    figure that a notebook displays. ``ax`` draws into an existing axes instead (e.g. a grid).
    """
    content = result.content()
    size = (max(4.0, 0.45 * len(content) + 1.5), 3.2)
    own_figure = ax is None
    if ax is None and path is not None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=size).subplots()
    elif ax is None:
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=size)[1]
    from matplotlib import colormaps

    labels = [t.strip() or "␣" for t, _, _ in content]
    values = [n for _, _, n in content]
    ax.bar(range(len(values)), values, color=colormaps["Reds"]([0.25 + 0.75 * min(max(v, 0), 1) for v in values]))
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("normalized significance")
    short = result.prompt if len(result.prompt) <= 70 else result.prompt[:67] + "..."
    ax.set_title(f"row {result.row}: {short}", fontsize=9)
    fig = ax.figure
    if own_figure:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
