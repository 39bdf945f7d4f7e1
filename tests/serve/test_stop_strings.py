"""Stop strings on generated text: across piece boundaries, OpenAI (excluded, held back) and TGI (kept) rules."""

from __future__ import annotations

from serve.stop_strings import StopStringMatcher


def _run(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.finish())
    return out, False


def test_stop_spanning_pieces_is_excluded_and_never_shown_partially():
    matcher = StopStringMatcher(["END"], include_stop=False)
    out, stopped = _run(matcher, ["Hello E", "N", "D and more"])
    assert stopped and matcher.matched == "END"
    assert out == ["Hello ", "", ""]  # "E" and "N" were held back, then dropped with the stop text
    assert matcher.text == "Hello "


def test_held_back_text_is_released_when_it_stops_looking_like_a_stop():
    matcher = StopStringMatcher(["END"], include_stop=False)
    out, stopped = _run(matcher, ["Hello E", "N", "A!"])
    assert not stopped
    assert out == ["Hello ", "", "ENA!", ""]
    assert matcher.text == "Hello ENA!"


def test_tgi_semantics_keep_the_stop_text_and_cut_after_it():
    matcher = StopStringMatcher(["\n\n"], include_stop=True)
    out, stopped = _run(matcher, ["line one\n", "\nline two"])
    assert stopped and out == ["line one\n", "\n"]
    assert matcher.text == "line one\n\n"


def test_earliest_of_several_stops_wins():
    matcher = StopStringMatcher(["world", "lo w"], include_stop=False)
    out, stopped = _run(matcher, ["hello world"])
    assert stopped and matcher.matched == "lo w" and matcher.text == "hel"


def test_no_stops_releases_everything_at_once():
    matcher = StopStringMatcher([], include_stop=False)
    assert _run(matcher, ["a", "b"]) == (["a", "b", ""], False)


def test_finish_releases_a_held_back_prefix():
    matcher = StopStringMatcher(["STOP"], include_stop=False)
    out, stopped = _run(matcher, ["the ST"])
    assert not stopped and out == ["the ", "ST"]
