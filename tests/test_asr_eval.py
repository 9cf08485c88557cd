"""ASR scoring: hand-computed CER/WER, normalisation, corpus-level aggregation, empty references."""

import math

import pytest

from lit_keomni.eval.asr import error_rate, normalize


def test_one_substitution_in_four_words() -> None:
    out = error_rate(["the cat sat down"], ["the cat sat up"], ["en"])
    assert out["wer_en"] == pytest.approx(0.25)
    # Characters: "down" → "up" in "the cat sat down" (16 chars with spaces): 2 substitutions + 2 deletions.
    assert out["cer_en"] == pytest.approx(4 / 16)
    assert out["n_en"] == 1 and "cer_zh" not in out and "n_zh" not in out


def test_mandarin_character_errors() -> None:
    out = error_rate(["今天天气很好"], ["今天天汽很"], ["zh"])  # 1 substitution + 1 deletion over 6 characters
    assert out["cer_zh"] == pytest.approx(2 / 6)
    assert out["wer"] == pytest.approx(2 / 6)  # each Han character is one unit
    assert "wer_en" not in out and out["n_zh"] == 1


def test_punctuation_case_and_full_width_ignored() -> None:
    assert normalize("Hello, WORLD!", "en") == "hello world"
    assert normalize("ＨＥＬＬＯ　ｗｏｒｌｄ！", "en") == "hello world"
    assert normalize("你好，世界！“引号”《书名》、：；？。", "zh") == "你好世界引号书名"
    assert normalize("你 好 世 界", "cmn") == "你好世界"
    out = error_rate(
        ["Hello, world!", "你好，世界。"],
        ["ＨＥＬＬＯ world", "你好 世界"],
        ["en", "zh"],
    )
    assert out["cer"] == 0 and out["wer"] == 0 and out["wer_en"] == 0 and out["cer_zh"] == 0


def test_arabic_and_chinese_numerals_score_equal() -> None:
    assert normalize("我有3个苹果", "zh") == normalize("我有三个苹果", "zh") == "我有三个苹果"
    assert normalize("1,000元", "zh") == "一千元"
    assert error_rate(["他今年三十岁"], ["他今年30岁"], ["zh-CN"])["cer_zh"] == 0


def test_aggregation_is_corpus_level() -> None:
    refs = ["a b c d e f g h", "x y"]  # 8 + 2 words
    hyps = ["a b c d e f g h", "x z"]  # 0 + 1 errors
    out = error_rate(refs, hyps, ["en", "en"])
    assert out["wer_en"] == pytest.approx(1 / 10)  # the mean of per-utterance rates would be 0.25
    zh = error_rate(["一二三四五六七八", "甲乙"], ["一二三四五六七八", "甲丙"], ["zh", "zh"])
    assert zh["cer_zh"] == pytest.approx(1 / 10)


def test_mixed_languages_pool_units() -> None:
    out = error_rate(["the cat sat down", "今天天气很好"], ["the cat sat up", "今天天汽很好"], ["en", "zh"])
    assert out["wer"] == pytest.approx((1 + 1) / (4 + 6))
    assert out["cer"] == pytest.approx((4 + 1) / (16 + 6))
    assert (out["n_en"], out["n_zh"], out["n_empty_ref"]) == (1, 1, 0)


def test_code_switched_mandarin_counts_english_words_as_units() -> None:
    out = error_rate(["我用iPhone手机"], ["我用 android 手机"], ["zh"])
    assert out["wer"] == pytest.approx(1 / 5)  # 我 用 iphone 手 机: one word substituted


def test_empty_reference_skipped_and_empty_hypothesis_scored() -> None:
    out = error_rate(["...", "the cat", "，。"], ["anything", "", "你好"], ["en", "en", "zh"])
    assert out["n_empty_ref"] == 2
    assert out["wer_en"] == 1.0  # empty hypothesis: all deletions
    assert "cer_zh" not in out and "n_zh" not in out
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in out.values())


def test_nothing_scored_gives_only_counts() -> None:
    assert error_rate(["。"], ["好"], ["zh"]) == {"n_empty_ref": 1}
    assert error_rate([], [], []) == {"n_empty_ref": 0}


def test_insertions_can_exceed_one() -> None:
    assert error_rate(["hi"], ["oh my god hi there"], ["en"])["wer_en"] == pytest.approx(4.0)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        error_rate(["a"], [], ["en"])
    with pytest.raises(ValueError, match="'fr'"):
        error_rate(["a"], ["a"], ["fr"])
