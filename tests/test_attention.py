"""Agent attention against the formulas written out, and a merged diffusers Attention layer."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, CustomDiffusionAttnProcessor2_0
from reference import agent_attention_reference

from agentsd import AgentSDConfig, agent_attention
from agentsd.attention import AgentSettings, attend_merged, processor_kwargs
from agentsd.merge import make_plan
from agentsd.patch import BlockState, UNetState


def _qkva(dtype=torch.float32, b=2, h=3, n=50, m=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, size, d, generator=g).to(dtype) for size in (n, n, n, m)]


@pytest.mark.parametrize("k_scale2,k_shortcut", [(0.3, 0.075), (1.0, 0.0), (0.5, 0.2)])
def test_agent_attention_matches_the_formulas(k_scale2, k_shortcut):
    q, k, v, a = _qkva(torch.float64)
    ours = agent_attention(q, k, v, a, k_scale2, k_shortcut)
    assert torch.allclose(ours, agent_attention_reference(q, k, v, a, k_scale2, k_shortcut), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agent_attention_low_precision_and_fp32_upcast(dtype):
    q, k, v, a = _qkva(torch.float32)
    exact = agent_attention_reference(q, k, v, a, 0.3, 0.075)
    low = [t.to(dtype) for t in (q, k, v, a)]
    plain, upcast = agent_attention(*low), agent_attention(*low, upcast=True)
    assert plain.dtype == upcast.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert torch.allclose(plain.float(), exact, atol=tol)
    assert (upcast.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-3


def _plan(metric, h, w, **phase):
    config = AgentSDConfig(schedule="fixed", use_rand=False, **phase)
    unet = UNetState(config=config, num_train_timesteps=1000)
    block = BlockState(unet=unet, index=0, downsample=1)
    unet.blocks.append(block)
    unet.start_call(torch.zeros(1, 4, h, w), 999)
    return AgentSettings.of(config), make_plan(config.phases[0], block.layout, metric)


def _attention(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def test_self_attention_with_agents_equals_plain_implementation():
    attn = _attention()
    x = torch.randn(2, 64, 32)
    normed = torch.nn.functional.layer_norm(x, (32,))
    agents, plan = _plan(x, 8, 8, ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    assert plan.agents is not None
    with torch.no_grad():
        ours = attend_merged(attn, normed, plan, attn, agents)
        feats, agents = plan.merge(normed), plan.agents.merge(normed)
        heads = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
        out = agent_attention_reference(
            heads(attn.to_q(feats)),
            heads(attn.to_k(feats)),
            heads(attn.to_v(feats)),
            heads(attn.to_q(agents)),
            0.3,
            0.075,
        )
        expected = plan.unmerge(attn.to_out[0](out.transpose(1, 2).flatten(2)))
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, atol=1e-5)


def test_without_agents_the_layer_runs_its_own_processor_on_merged_tokens():
    attn = _attention()
    x = torch.randn(2, 64, 32)
    agents, plan = _plan(x, 8, 8, ratio=0.5, sx=2, sy=2, agent_ratio=0.5)
    assert plan.agents is None
    with torch.no_grad():
        expected = plan.unmerge(AttnProcessor2_0()(attn, plan.merge(x)))
        assert torch.equal(attend_merged(attn, x, plan, attn, agents), expected)


def test_agents_are_skipped_for_cross_attention_masks_and_processors_with_weights():
    """Those calls go through the layer's processor on the merged tokens, so nothing it does is lost."""
    attn = _attention()
    x = torch.randn(2, 64, 32)
    agents, plan = _plan(x, 8, 8, ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        tome = plan.unmerge(attn(plan.merge(x)))
        assert torch.equal(attend_merged(attn, x, plan, attn, None), tome)
        call_kwargs, plain = processor_kwargs(attn, (), {"encoder_hidden_states": context, "unknown": 1})
        assert call_kwargs == {"encoder_hidden_states": context}
        assert not plain and processor_kwargs(attn, (), {})[1] and not processor_kwargs(attn, (None, x[:, :1]), {})[1]
        layer = lambda t: attn.processor(attn, t, **call_kwargs)  # noqa: E731
        cross = plan.unmerge(attn(plan.merge(x), encoder_hidden_states=context))
        assert torch.equal(attend_merged(attn, x, plan, layer, agents if plain else None), cross)
        attn.set_processor(CustomDiffusionAttnProcessor2_0(train_q_out=True, hidden_size=32).eval())
        weighted = plan.unmerge(attn(plan.merge(x)))
        assert torch.equal(attend_merged(attn, x, plan, attn, agents), weighted)
