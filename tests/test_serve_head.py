"""The engine's vocabulary head (engine/head.py): same logits as the decoder's own head, one stored copy."""

from __future__ import annotations

import pytest
import torch

from autoglm_train.engine.head import body_of, store_transposed, vocab_head
from autoglm_train.model.decoder import DecoderSpec, build_decoder

SPEC = DecoderSpec("head-test", 32, 2, 4, 2, 64, tie_word_embeddings=True)


def _decoder(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = SPEC if tied else DecoderSpec("untied", 32, 2, 4, 2, 64, tie_word_embeddings=False)
    return build_decoder(spec, tokenizer_size=300, pad_token_id=0).eval()


def _logits(decoder: torch.nn.Module, ids: torch.Tensor, head) -> torch.Tensor:
    return head(body_of(decoder)(input_ids=ids).last_hidden_state)


def test_vocab_head_gives_the_decoders_own_logits() -> None:
    decoder = _decoder()
    ids = torch.randint(0, 300, (3, 7))
    with torch.inference_mode():
        expected = decoder(input_ids=ids).logits
        got = _logits(decoder, ids, vocab_head(decoder))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_store_transposed_keeps_values_tie_and_one_copy(tied: bool) -> None:
    decoder = _decoder(tied)
    head, embed = decoder.get_output_embeddings(), decoder.get_input_embeddings()
    before_head, before_embed = head.weight.detach().clone(), embed.weight.detach().clone()
    ids = torch.randint(0, 300, (2, 5))
    with torch.inference_mode():
        expected = decoder(input_ids=ids).logits

    assert store_transposed(decoder)
    head, embed = decoder.get_output_embeddings(), decoder.get_input_embeddings()
    assert head.weight.t().is_contiguous() and head.weight.shape == before_head.shape
    assert torch.equal(head.weight, before_head) and torch.equal(embed.weight, before_embed)
    assert (embed.weight is head.weight) == tied  # a tied vocabulary is still held once
    with torch.inference_mode():
        got = _logits(decoder, ids, vocab_head(decoder))
        via_module = decoder(input_ids=ids).logits  # every other reader of the weight still works
    # the head reads the stored matrix itself: no second copy is made
    assert vocab_head(decoder).weight_t.data_ptr() == head.weight.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_module, expected, rtol=1e-5, atol=1e-5)


def test_heads_the_layout_cannot_serve_keep_their_module() -> None:
    decoder = _decoder().to(torch.bfloat16)
    assert not store_transposed(decoder)
    assert vocab_head(decoder) is decoder.get_output_embeddings()
