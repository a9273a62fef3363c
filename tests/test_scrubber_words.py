"""The scrubber skips a credential pattern only where it cannot match: the same text as running them all."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import _TOKEN_RULES, Scrubber

# Pieces a credential is made of, in any case, with non-ASCII look-alikes (the long s and the Kelvin sign
# match s and k under IGNORECASE) and plain words around them.
_PIECES = ["Bearer ", "KEY ", "key", "Token", "basic ", "api_key", "X-Api-Key", "access-token", "Authorization",
           "SECRET", "pa\u017f\u017fword", "\u212aey ", "password", ": ", "=", '"', "'", "sk-", "pk-", "rk-", "r8_",
           "Sk-", "R8_", "[redacted]", "4f2a9c1e", "abcdefghij0123456789", "a cat", " ", "\u00e9", "-", "_", ":"]
_text = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)


def _every_pattern(value: str) -> str:
    for pattern, replacement, _ in _TOKEN_RULES:
        value = pattern.sub(replacement, value)
    return value


@settings(max_examples=2000, deadline=None)
@given(_text)
def test_skipping_patterns_changes_nothing(text):
    assert Scrubber([]).text(text) == _every_pattern(text)


def test_a_prompt_without_credentials_is_kept_and_one_with_them_is_not():
    prompt = "A photorealistic portrait of an elderly fisherman at golden hour, 85mm lens, film grain"
    assert Scrubber([]).text(prompt) == prompt
    assert Scrubber([]).text("ſecret: hunter2hunter2") == "ſecret: [redacted]"
    assert Scrubber([]).text("BASIC dXNlcjpwYXNzd29yZDE=") == "BASIC [redacted]"


def test_a_token_after_an_authorization_scheme_goes_whatever_its_shape_and_the_scheme_stays():
    scrub = Scrubber([]).text
    # Tokens without a digit went through whole (the rule for a bare "Bearer <token>" wants one), and the
    # scheme word was redacted in their place.
    assert scrub("Authorization: Bearer abcdefghijklmnop") == "Authorization: Bearer [redacted]"
    assert scrub("authorization=Basic dXNlcjpwYXNz") == "authorization=Basic [redacted]"
    assert scrub('{"Authorization": "Bearer abcdefghijklm"}') == '{"Authorization": "Bearer [redacted]"}'
    assert scrub("Authorization: Bearer sk-abc123def456ghi789") == "Authorization: Bearer [redacted]"
    assert scrub("x-api-key: ABCDEFGHIJ") == "x-api-key: [redacted]"
    # An instruction is not a credential: it stays readable.
    assert scrub("send 'Authorization: Bearer <key>' with the key") == "send 'Authorization: Bearer <key>' with the key"
