"""An independent, plain AgentSD for checking the package against.

Merging comes from the ``tomesd`` package (its bipartite matching run twice: with ``r`` for the
tokens and with ``agent_r`` for the agents, which share the ranking because the metric is the
same); attention is the formula written out with einsum and softmax. Only ``use_rand=False`` is
covered, so that nothing depends on a random generator.
"""

from __future__ import annotations

import math

import torch
from tomesd.merge import bipartite_soft_matching_random2d


def agent_attention_reference(q, k, v, a, k_scale2: float, k_shortcut: float) -> torch.Tensor:
    """[B, H, N, d] queries/keys/values and [B, H, M, d] agents -> [B, H, N, d]."""
    scale = q.shape[-1] ** -0.5
    agent_attn = torch.softmax(torch.einsum("bhmd,bhnd->bhmn", a, k) * scale, dim=-1)
    agent_v = torch.einsum("bhmn,bhnd->bhmd", agent_attn, v)
    q_attn = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, a) * scale**k_scale2, dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", q_attn, agent_v) + k_shortcut * v


class ReferenceAgentSD:
    """Patches a UNet's top-level blocks by hand with plain PyTorch hooks (no agentsd code).

    One fixed phase; ``use_rand`` off. The metric is captured by a forward pre-hook on each block,
    the latent size by one on the UNet.
    """

    def __init__(self, unet, ratio, agent_ratio, sx, sy, k_scale2=0.3, k_shortcut=0.075):
        self.ratio, self.agent_ratio, self.sx, self.sy = ratio, agent_ratio, sx, sy
        self.k_scale2, self.k_shortcut = k_scale2, k_shortcut
        self.handles = [unet.register_forward_pre_hook(self._capture_size, with_kwargs=True)]
        self.latent_tokens = None
        self.original = {}
        for name, module in unet.named_modules():
            if type(module).__name__ == "BasicTransformerBlock" and (
                name.startswith("down_blocks.0") or name.startswith(f"up_blocks.{len(unet.up_blocks) - 1}")
            ):
                self.handles.append(module.register_forward_pre_hook(self._capture_metric, with_kwargs=True))
                self.original[module.attn1] = module.attn1.processor
                module.attn1.set_processor(self._processor(module))

    def _capture_size(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.size = sample.shape[-2:]

    def _capture_metric(self, module, args, kwargs):
        module._reference_metric = args[0] if args else kwargs["hidden_states"]

    def _processor(self, block):
        def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            x = block._reference_metric
            n = x.shape[1]
            h, w = self.size
            ds = int(math.ceil(math.sqrt(h * w // n)))
            h, w = math.ceil(h / ds), math.ceil(w / ds)
            r, agent_r = int(n * self.ratio), int(n * self.agent_ratio)
            merge, unmerge = bipartite_soft_matching_random2d(x, w, h, self.sx, self.sy, r, no_rand=True)
            agent_merge, _ = bipartite_soft_matching_random2d(x, w, h, self.sx, self.sy, agent_r, no_rand=True)
            feats, agents = merge(hidden_states), agent_merge(hidden_states)
            heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
            q, k, v, a = (heads(f) for f in (attn.to_q(feats), attn.to_k(feats), attn.to_v(feats), attn.to_q(agents)))
            if agents.shape[1] * 2 < feats.shape[1]:
                out = agent_attention_reference(q, k, v, a, self.k_scale2, self.k_shortcut)
            else:
                weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
                out = weights @ v
            out = attn.to_out[0](out.transpose(1, 2).flatten(2))
            return unmerge(out)

        return processor

    def remove(self):
        for handle in self.handles:
            handle.remove()
        for attn, processor in self.original.items():
            attn.set_processor(processor)
