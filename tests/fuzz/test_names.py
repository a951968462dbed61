"""Names against arbitrary text: channels, groups and stop tokens are accepted exactly when
they follow the documented rule (1-200 of letters, digits and ``_ . : / @ + = -``), namespaces
theirs (1-64 of letters, digits and ``_ . - :``), else a ``ConfigurationError``; a valid name
survives the key layout both ways."""

from __future__ import annotations

import string

import pytest
from hypothesis import strategies as st

from broker import ConfigurationError
from broker._names import (
    channel_from_key,
    channel_key,
    check_channel,
    check_group,
    check_stop_name,
)
from broker._settings import Settings
from tests.fuzz.conftest import BUDGET, Examples, run_for

ALLOWED = set(string.ascii_letters + string.digits + "_.:/@+=-")
CHECKS = (check_channel, check_group, check_stop_name)


def valid(name: str) -> bool:
    return 1 <= len(name) <= 200 and set(name) <= ALLOWED


names = st.one_of(
    st.text(max_size=210),
    st.text(alphabet=sorted(ALLOWED), min_size=1, max_size=210),
    # a valid name with one odd character somewhere (newline, brace, space, non-ASCII digit)
    st.builds(
        lambda head, odd, tail: head + odd + tail,
        st.text(alphabet=sorted(ALLOWED), max_size=20),
        st.sampled_from(["\n", "\r", "{", "}", " ", "\t", "\x00", "\u0661", "\u00df", "\u2028"]),
        st.text(alphabet=sorted(ALLOWED), max_size=20),
    ),
)


def test_fuzz_names() -> None:
    examples = Examples("names")

    def body(name: str, namespace: str) -> None:
        examples.hit()
        for check in CHECKS:
            if valid(name):
                assert check(name) == name
            else:
                with pytest.raises(ConfigurationError):
                    check(name)
        if valid(name):
            assert channel_from_key(namespace, channel_key(namespace, name)) == name

    run_for(examples, body, names, st.sampled_from(["broker", "t1", "a:b"]), budget=BUDGET / 6)


NAMESPACE = set(string.ascii_letters + string.digits + "_.-:")


def test_fuzz_namespaces() -> None:
    examples = Examples("namespaces")

    def body(namespace: str) -> None:
        examples.hit()
        ok = 1 <= len(namespace) <= 64 and set(namespace) <= NAMESPACE
        if ok:
            assert Settings.from_url("redis://localhost/0", namespace=namespace).namespace
        else:
            with pytest.raises(ConfigurationError):
                Settings.from_url("redis://localhost/0", namespace=namespace)

    odd = st.sampled_from(["\n", " ", "{", "/", "\u00e9"])
    run_for(
        examples,
        body,
        st.one_of(
            st.text(max_size=70),
            st.text(alphabet=sorted(NAMESPACE), min_size=1, max_size=70),
            st.builds(
                lambda head, c: head + c, st.text(alphabet=sorted(NAMESPACE), max_size=63), odd
            ),
        ),
        budget=BUDGET / 6,
    )


# -- what the fuzzer found, as regular tests ----------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", ["orders\n", "a\n"])
def test_a_trailing_newline_is_not_a_valid_name(check: object, name: str) -> None:
    """``re.match`` with ``$`` let a final newline through (``$`` matches before it)."""
    with pytest.raises(ConfigurationError):
        check(name)  # type: ignore[operator]


def test_a_namespace_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_url("redis://localhost/0", namespace="broker\n")


def test_a_key_with_a_trailing_newline_is_not_a_channel() -> None:
    assert channel_from_key("broker", "broker:{orders\n}") is None
