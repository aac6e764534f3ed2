"""An independent, plain AgentSD for the diffusion transformers (SD3 / SD3.5, Flux, PixArt), written
from ``agentsd-dit.md`` and ``agentsd-algorithm.md`` to check the package against.

Nothing here calls agentsd. The merge plan is ToMe's bipartite soft matching written out per sample
(cosine similarity of every source to every destination, sources ranked by their best score, the
top ``r`` averaged into their best destinations), stored as a dense averaging matrix: merging is
one einsum with it, unmerging one einsum with its 0/1 pattern. The agents are the second cut of the
same ranking. Attention is softmax and einsum; Flux's rotary embedding is recomputed from the
token's grid row and column and applied as a complex product.

The model's own code runs around it: a forward pre-hook on each block captures the block input
(the similarity metric) and plans there; the attention layers get replacement processors, so the
blocks' norms, gates, residuals and feed-forwards are the model's. The only input taken from
outside is, for random destinations, where the destinations are (``destinations``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Flux's rotary base (``FluxPosEmbed(theta=10000)``).
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Merge:
    """One merge of a batch of N tokens into G groups, per sample.

    Attributes:
        weights: [B, G, N] averaging weights: row g is 1/|g| on the tokens of group g.
        members: [B, N, G] 0/1: which group each original token went into.
        positions: [B, G] grid position of each group's representative (a kept source itself, a
            destination itself).
    """

    weights: torch.Tensor
    members: torch.Tensor
    positions: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, G, C]: each group's mean."""
        return torch.einsum("bgn,bnc->bgc", self.weights.to(x.dtype), x)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, G, C] -> [B, N, C]: each token copies its group's value."""
        return torch.einsum("bng,bgc->bnc", self.members.to(y.dtype), y)


def fixed_destinations(h: int, w: int, sx: int, sy: int) -> list[int]:
    """The top-left token of every full sx-by-sy cell of an h-by-w row-major grid."""
    return [cy * sy * w + cx * sx for cy in range(h // sy) for cx in range(w // sx)]


def check_destinations(dst: list[int], h: int, w: int, sx: int, sy: int) -> None:
    """Assert that ``dst`` holds exactly one token of every full cell and nothing else."""
    cells = sorted(((p // w) // sy, (p % w) // sx) for p in dst)
    inside = all(p // w < (h // sy) * sy and p % w < (w // sx) * sx for p in dst)
    assert inside and cells == [(cy, cx) for cy in range(h // sy) for cx in range(w // sx)], dst


def _groups(ranked: list[int], best: list[int], src: list[int], dst: list[int], r: int) -> list[list[int]]:
    """Groups (each led by its representative) when the first ``r`` ranked sources merge into their
    best destinations: kept sources alone, each destination with what merged into it; ordered by
    representative position."""
    into = {d: [d] for d in dst}
    for i in ranked[:r]:
        into[dst[best[i]]].append(src[i])
    groups = [[src[i]] for i in ranked[r:]] + list(into.values())
    return sorted(groups, key=lambda group: group[0])


def _merge_of(groups_per_sample: list[list[list[int]]], n: int) -> Merge:
    batch, g = len(groups_per_sample), len(groups_per_sample[0])
    weights = torch.zeros(batch, g, n, dtype=torch.float64)
    positions = torch.zeros(batch, g, dtype=torch.long)
    for b, groups in enumerate(groups_per_sample):
        for j, group in enumerate(groups):
            positions[b, j] = group[0]
            for p in group:
                weights[b, j, p] = 1.0 / len(group)
    members = (weights > 0).to(torch.float64).transpose(1, 2)
    assert torch.all(members.sum(-1) == 1)  # every token in exactly one group
    return Merge(weights, members, positions)


def bipartite_merges(metric: torch.Tensor, dst: list[int], cuts: list[int]) -> list[Merge]:
    """ToMe's bipartite soft matching of ``metric`` [B, N, C] with destinations ``dst`` (grid
    positions), cut at each of ``cuts`` (tokens to remove, each capped at the number of sources) of
    one ranking."""
    batch, n, _ = metric.shape
    dst = sorted(dst)
    src = [p for p in range(n) if p not in set(dst)]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    per_cut: list[list[list[list[int]]]] = [[] for _ in cuts]
    for b in range(batch):
        scores = torch.einsum("sc,dc->sd", unit[b, src], unit[b, dst])
        best_score, best = scores.max(dim=-1)
        best_score, best = best_score.tolist(), best.tolist()
        ranked = sorted(range(len(src)), key=lambda i: -best_score[i])
        for groups, r in zip(per_cut, cuts):
            groups.append(_groups(ranked, best, src, dst, min(r, len(src))))
    return [_merge_of(groups, n) for groups in per_cut]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, H, S, d] tensors."""
    weights = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def agent_attention(q, k, v, a, shortcut, k_scale2: float, k_shortcut: float) -> torch.Tensor:
    """softmax(q a^T s^k_scale2) softmax(a k^T s) v + k_shortcut * shortcut, s = d ** -0.5."""
    s = q.shape[-1] ** -0.5
    gather = torch.softmax(torch.einsum("bhad,bhkd->bhak", a, k) * s, dim=-1)
    agent_feature = torch.einsum("bhak,bhkd->bhad", gather, v)
    read = torch.softmax(torch.einsum("bhqd,bhad->bhqa", q, a) * s**k_scale2, dim=-1)
    return torch.einsum("bhqa,bhad->bhqd", read, agent_feature) + k_shortcut * shortcut


def rotary_angles(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> torch.Tensor:
    """[..., 3] position ids -> [..., D / 2] float64 angles of Flux's rotary embedding: the j-th
    channel pair of axis i turns by ``ids[i] * theta ** (-2j / axes_dims[i])``."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(ids[..., axis : axis + 1].to(torch.float64) * freqs)
    return torch.cat(parts, dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair of ``x`` [B, H, S, D] by ``angles`` [B or 1, S, D / 2],
    as the complex product (x0 + i x1) * e^(i angle)."""
    turn = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(1)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _joined(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def _normed(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


@dataclass
class BlockPlan:
    """One block call's plan: the merged tokens' merge and (when they pass the half rule) the agents'."""

    name: str
    grid: tuple[int, int]
    tokens: Merge
    agents: Merge | None


Destinations = Callable[[int, int, int], list[int]]


class ReferenceDiT:
    """AgentSD on an SD3 / SD3.5, Flux or PixArt transformer, by hooks and processors (no agentsd code).

    One phase (``ratio``, ``agent_ratio``, ``sx``, ``sy``) for every call. ``destinations(index, h, w)``
    gives the destination positions of the block that runs ``index``-th in a call, or ``None`` for the
    fixed top-left ones. ``branches`` records, per attention call, ``(block, layer, "agents" or
    "softmax")``.

    ``merge_mlp``: the feed-forward (``ff``) runs on the merged tokens too (plain ToMe with the block's
    plan). In Flux's single-stream block the MLP branch's ``proj_mlp`` runs on the merged image
    tokens and is unmerged right after: the note's "join and proj_out on the merged tokens, update
    unmerged" is the same, since the activation, the join, ``proj_out`` and the gate act on each token
    alone and a merged token's attention output is what its members copy.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ratio: float,
        agent_ratio: float,
        sx: int,
        sy: int,
        destinations: Destinations | None = None,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        merge_mlp: bool = False,
    ) -> None:
        self.model, self.family = model, type(model).__name__
        self.ratio, self.agent_ratio, self.sx, self.sy = ratio, agent_ratio, sx, sy
        self.destinations, self.k_scale2, self.k_shortcut = destinations, k_scale2, k_shortcut
        self.branches: list[tuple[str, str, str]] = []
        self.plans: list[BlockPlan] = []
        self.handles = [model.register_forward_pre_hook(self._start_call, with_kwargs=True)]
        self.original: dict[torch.nn.Module, object] = {}
        for name, block in self._blocks():
            self.handles.append(block.register_forward_pre_hook(self._planner(name), with_kwargs=True))
            kind = type(block).__name__
            if kind == "BasicTransformerBlock":
                self._replace(block.attn1, SelfAttention(self, block, "attn1"))
            else:
                self._replace(block.attn, JointAttention(self, block, kind))
                if getattr(block, "attn2", None) is not None:
                    self._replace(block.attn2, SelfAttention(self, block, "attn2"))
            if merge_mlp:
                single = kind == "FluxSingleTransformerBlock"
                mlp = block.proj_mlp if single else block.ff
                self.handles.append(mlp.register_forward_hook(self._merged_mlp(block, single)))

    def _blocks(self) -> list[tuple[str, torch.nn.Module]]:
        found = [(f"transformer_blocks.{i}", block) for i, block in enumerate(self.model.transformer_blocks)]
        single = getattr(self.model, "single_transformer_blocks", ())
        return found + [(f"single_transformer_blocks.{i}", block) for i, block in enumerate(single)]

    def _replace(self, attn: torch.nn.Module, processor: object) -> None:
        self.original[attn] = attn.processor
        attn.set_processor(processor)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for attn, processor in self.original.items():
            attn.set_processor(processor)

    def _start_call(self, module, args, kwargs) -> None:
        """Note the call's token grid (and Flux's position ids); block indices restart."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.calls_in_order = 0
        if self.family == "FluxTransformer2DModel":
            img_ids, txt_ids = kwargs["img_ids"], kwargs["txt_ids"]
            self.grid = (int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1)
            h, w = self.grid
            rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
            assert torch.equal(img_ids, torch.stack([torch.zeros(h * w), rows, cols], dim=-1).to(img_ids.dtype))
            self.text_ids = txt_ids
        else:
            patch = self.model.config.patch_size
            self.grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)

    def _planner(self, name: str):
        def plan(block, args, kwargs) -> None:
            metric = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            index, self.calls_in_order = self.calls_in_order, self.calls_in_order + 1
            h, w = self.grid
            n = metric.shape[1]
            assert n == h * w, (n, self.grid)
            if self.destinations is None:
                dst = fixed_destinations(h, w, self.sx, self.sy)
            else:
                dst = [int(p) for p in self.destinations(index, h, w)]
            check_destinations(dst, h, w, self.sx, self.sy)
            r, agent_r = int(n * self.ratio), int(n * self.agent_ratio)
            num_src = n - len(dst)
            r, agent_r = min(r, num_src), min(agent_r, num_src)
            with_agents = (n - agent_r) * 2 < n - r
            merges = bipartite_merges(metric, dst, [r, agent_r] if with_agents else [r])
            block._reference_plan = BlockPlan(name, self.grid, merges[0], merges[1] if with_agents else None)
            self.plans.append(block._reference_plan)

        return plan

    def _merged_mlp(self, block: torch.nn.Module, after_text: bool):
        """A forward hook that replaces the output of ``block``'s feed-forward (or, ``after_text``, of
        a single-stream block's ``proj_mlp``, whose input starts with the text tokens) by its output
        on the merged image tokens, unmerged."""

        def hook(module, args, output):
            x = args[0]
            plan: BlockPlan = block._reference_plan
            n = plan.tokens.members.shape[1]
            text, image = x[:, : x.shape[1] - n], x[:, x.shape[1] - n :]
            image_out = plan.tokens.unmerge(type(module).forward(module, plan.tokens.merge(image)))
            self.branches.append((plan.name, "mlp", "merged"))
            return torch.cat([type(module).forward(module, text), image_out], dim=1) if after_text else image_out

        return hook

    def rotary(self, text_tokens: int, table) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Flux: the text rows' angles [1, T, D/2], and a function from grid positions [B, G] to
        their angles [B, G, D/2] (an image token at row y, column x has ids (0, y, x)).

        The angles are recomputed from the ids; the model's own table must agree with them at every
        token (a check of this reference, not of agentsd).
        """
        axes = tuple(self.model.config.axes_dims_rope)
        h, w = self.grid
        assert text_tokens == self.text_ids.shape[0]
        text = rotary_angles(self.text_ids, axes).unsqueeze(0)

        def at(positions: torch.Tensor) -> torch.Tensor:
            ids = torch.stack([torch.zeros_like(positions), positions // w, positions % w], dim=-1)
            return rotary_angles(ids, axes)

        everything = torch.cat([text[0], at(torch.arange(h * w))])
        cos, sin = table
        assert torch.allclose(cos, everything.cos().repeat_interleave(2, dim=-1).float(), atol=1e-5)
        assert torch.allclose(sin, everything.sin().repeat_interleave(2, dim=-1).float(), atol=1e-5)
        return text, at

    def record(self, plan: BlockPlan, layer: str) -> bool:
        self.branches.append((plan.name, layer, "agents" if plan.agents is not None else "softmax"))
        return plan.agents is not None


class SelfAttention:
    """PixArt's ``attn1`` and SD3.5's image-only ``attn2``: AgentSD as in the UNet's ``attn1``."""

    def __init__(self, reference: ReferenceDiT, block: torch.nn.Module, layer: str) -> None:
        self.reference, self.block, self.layer = reference, block, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.group_norm is None
        plan: BlockPlan = self.block._reference_plan
        merged = plan.tokens.merge(hidden_states)
        q = _normed(attn.norm_q, _heads(attn, attn.to_q(merged)))
        k = _normed(attn.norm_k, _heads(attn, attn.to_k(merged)))
        v = _heads(attn, attn.to_v(merged))
        if self.reference.record(plan, self.layer):
            a = _normed(attn.norm_q, _heads(attn, attn.to_q(plan.agents.merge(hidden_states))))
            out = agent_attention(q, k, v, a, v, self.reference.k_scale2, self.reference.k_shortcut)
        else:
            out = softmax_attention(q, k, v)
        return plan.tokens.unmerge(attn.to_out[1](attn.to_out[0](_joined(out))))


class JointAttention:
    """The joint attention of SD3's and Flux's double-stream blocks, and of Flux's single-stream block.

    Image rows through the agents (agent phase) or exact over the merged keys; text rows always exact
    over all keys. Keys and values in the model's order: ``[image ; text]`` in SD3, ``[text ; image]``
    in Flux.
    """

    def __init__(self, reference: ReferenceDiT, block: torch.nn.Module, kind: str) -> None:
        self.reference, self.block = reference, block
        self.text_first = kind.startswith("Flux")
        self.single = kind == "FluxSingleTransformerBlock"

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        assert attention_mask is None
        plan: BlockPlan = self.block._reference_plan
        n = plan.tokens.members.shape[1]
        if self.single:
            assert encoder_hidden_states is None
            text, image = hidden_states[:, :-n], hidden_states[:, -n:]
            text_layers = (attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        else:
            text, image = encoder_hidden_states, hidden_states
            text_layers = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        merged = plan.tokens.merge(image)
        q_i = _normed(attn.norm_q, _heads(attn, attn.to_q(merged)))
        k_i = _normed(attn.norm_k, _heads(attn, attn.to_k(merged)))
        v_i = _heads(attn, attn.to_v(merged))
        to_q, to_k, to_v, norm_q, norm_k = text_layers
        q_c, k_c = _normed(norm_q, _heads(attn, to_q(text))), _normed(norm_k, _heads(attn, to_k(text)))
        v_c = _heads(attn, to_v(text))
        with_agents = self.reference.record(plan, "attn")
        a = _normed(attn.norm_q, _heads(attn, attn.to_q(plan.agents.merge(image)))) if with_agents else None
        if image_rotary_emb is not None:
            text_angles, at = self.reference.rotary(text.shape[1], image_rotary_emb)
            q_c, k_c = rotate(q_c, text_angles), rotate(k_c, text_angles)
            q_i, k_i = rotate(q_i, at(plan.tokens.positions)), rotate(k_i, at(plan.tokens.positions))
            if a is not None:
                a = rotate(a, at(plan.agents.positions))
        if self.text_first:
            k, v = torch.cat([k_c, k_i], dim=2), torch.cat([v_c, v_i], dim=2)
        else:
            k, v = torch.cat([k_i, k_c], dim=2), torch.cat([v_i, v_c], dim=2)
        o_c = softmax_attention(q_c, k, v)
        if a is not None:
            o_i = agent_attention(q_i, k, v, a, v_i, self.reference.k_scale2, self.reference.k_shortcut)
        else:
            o_i = softmax_attention(q_i, k, v)
        o_i, o_c = _joined(o_i), _joined(o_c)
        if self.single:  # no output projection: proj_out of the block joins attention and MLP
            return torch.cat([o_c, plan.tokens.unmerge(o_i)], dim=1)
        image_out = plan.tokens.unmerge(attn.to_out[1](attn.to_out[0](o_i)))
        return image_out, (o_c if attn.context_pre_only else attn.to_add_out(o_c))
