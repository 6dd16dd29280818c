"""Stop strings never leak, not even partly, and UTF-8 split across tokens is reassembled."""

from capibara6.backends.stops import StopText


def run(pieces: list[bytes], stops: list[str]) -> tuple[str, bool]:
    st = StopText(stops)
    out = "".join(st.feed(p) for p in pieces)
    return out + st.flush(), st.stopped


def test_stop_across_tokens_is_cut() -> None:
    assert run([b"Hello", b" wo", b"rld", b" again"], [" world"]) == ("Hello", True)


def test_partial_match_released_when_it_diverges() -> None:
    st = StopText(["END"])
    assert st.feed(b"abc E") == "abc "
    assert st.feed(b"Nx") == "ENx"
    assert not st.stopped


def test_held_back_text_flushed_at_end() -> None:
    assert run([b"ab", b"E"], ["END"]) == ("abE", False)


def test_utf8_split_across_tokens() -> None:
    snow = "☃".encode()
    assert run([snow[:1], snow[1:2], snow[2:], b"!"], []) == ("☃!", False)


def test_earliest_stop_wins() -> None:
    assert run([b"one two three"], ["three", "two"]) == ("one ", True)


def test_push_takes_decoded_text() -> None:
    st = StopText(["<end_of_turn>"])
    assert st.push("abc<end") == "abc"
    assert st.push("_of_turn>x") == "" and st.stopped
    st = StopText(["\n\n"])
    assert st.push("a\n") == "a" and st.flush() == "\n"
