"""Agent attention against the formulas written out, and the processors on a real diffusers Attention."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from reference import agent_attention_reference

from agentsd import AgentSDConfig, agent_attention
from agentsd.attention import AgentSDAttnProcessor, TokenMergeProcessor
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


def _block_state(metric, h, w, **phase):
    config = AgentSDConfig(schedule="fixed", use_rand=False, **phase)
    unet = UNetState(config=config, num_train_timesteps=1000)
    block = BlockState(unet=unet, downsample=1)
    unet.blocks.append(block)
    unet.start_call(torch.zeros(1, 4, h, w), 999)
    block.plan = block.make_plan(metric)
    return block


def _attention(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def test_processor_with_agents_equals_plain_implementation():
    attn = _attention()
    x = torch.randn(2, 64, 32)
    normed = torch.nn.functional.layer_norm(x, (32,))
    block = _block_state(x, 8, 8, ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    assert block.plan.agents is not None
    plan = block.plan
    with torch.no_grad():
        ours = AgentSDAttnProcessor(block, AttnProcessor2_0())(attn, normed)
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


def test_processor_without_agents_runs_inner_on_merged_tokens():
    attn = _attention()
    x = torch.randn(2, 64, 32)
    block = _block_state(x, 8, 8, ratio=0.5, sx=2, sy=2, agent_ratio=0.5)
    plan = block.plan
    assert plan.agents is None
    with torch.no_grad():
        expected = plan.unmerge(AttnProcessor2_0()(attn, plan.merge(x)))
        assert torch.equal(TokenMergeProcessor(block, AttnProcessor2_0())(attn, x), expected)
        assert block.plan is plan  # attn2 is not the block's last merging stage here: the plan stays
        assert torch.equal(AgentSDAttnProcessor(block, AttnProcessor2_0())(attn, x), expected)
        assert block.plan is None  # attn1 is: the plan is released as soon as it is used


def test_processors_without_a_plan_are_the_inner_processor():
    attn = _attention()
    x = torch.randn(2, 64, 32)
    block = _block_state(x, 8, 8, ratio=0.0, sx=2, sy=2, agent_ratio=0.9)
    assert block.plan is None
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, x)
        assert torch.equal(AgentSDAttnProcessor(block, AttnProcessor2_0())(attn, x), expected)
        assert torch.equal(TokenMergeProcessor(block, AttnProcessor2_0())(attn, x), expected)
