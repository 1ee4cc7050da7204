"""CHAIR and POPE on hand-written captions and answers with hand-computed expected values."""

from __future__ import annotations

import pytest

from bpo_ray.metrics.chair import ObjectMentionExtractor, prior_typical_share, score_chair, synonyms_from_lines
from bpo_ray.metrics.rohrbach import RohrbachExtractor, rohrbach_synonyms, treebank_tokenize
from bpo_ray.metrics.pope import build_pope_probes, parse_answer, parse_yes_no, pope_metrics, score_pope
from bpo_ray.world import vocab
from bpo_ray.world.corpus import prior_typical_partner


def _mentions(text: str) -> list[str]:
    return [m.canonical for m in ObjectMentionExtractor(vocab.SYNONYMS).extract(text)]


# ------------------------------------------------------------------------------------ CHAIR


def test_chair_on_four_hand_written_captions() -> None:
    captions = [
        "There is a red mug on the left. There is a saucer in the center.",  # cup, saucer*  (* = hallucinated)
        "Two puppies and a dog leash.",  # dog, leash
        "A knife lies next to the forks.",  # knife*, fork
        "Nothing here but a keyboard.",  # keyboard
    ]
    truths = [{"cup"}, {"dog", "leash"}, {"fork"}, {"keyboard", "mouse"}]
    report = score_chair(captions, truths, vocab.SYNONYMS)
    # Captions with a hallucination: 1 and 3 -> CHAIR_s = 2/4. Mentions 2+2+2+1 = 7, 2 of them
    # hallucinated -> CHAIR_i = 2/7. Recall: 5 of 6 true objects mentioned (mouse is not).
    assert report.chair_s == pytest.approx(0.5)
    assert report.chair_i == pytest.approx(2 / 7)
    assert report.recall == pytest.approx(5 / 6)
    assert (report.n_captions, report.n_mentions, report.n_hallucinated_mentions) == (4, 7, 2)
    assert [item.mentioned for item in report.items] == [
        ["cup", "saucer"], ["dog", "leash"], ["knife", "fork"], ["keyboard"]
    ]
    assert [item.hallucinated for item in report.items] == [["saucer"], [], ["knife"], []]
    assert [item.chair_i for item in report.items] == pytest.approx([0.5, 0.0, 0.5, 0.0])
    # Both hallucinations are the prior partner of an object present.
    assert prior_typical_share(report.items, prior_typical_partner()) == 1.0


def test_prior_typical_share_counts_only_partners_of_present_objects() -> None:
    report = score_chair(
        ["A cup, a saucer and a pen.", "A dog and a knife."], [{"cup"}, {"dog"}], vocab.SYNONYMS
    )
    # Hallucinated: saucer (partner of cup: typical), pen (not), knife (not a dog's partner) -> 1/3.
    assert prior_typical_share(report.items, prior_typical_partner()) == pytest.approx(1 / 3)
    # Partners may also be collections (e.g. COCO co-occurrence top-k).
    assert prior_typical_share(report.items, {"dog": ["leash", "knife"]}) == pytest.approx(1 / 3)


def test_synonyms_plurals_and_whole_words() -> None:
    assert _mentions("Three mice, two knives and some toothbrushes.") == ["mouse", "knife", "toothbrush"]
    assert _mentions("Sheets of paper beside a Tooth-Brush and a coffee cup.") == ["paper", "toothbrush", "cup"]
    assert _mentions("A penguin on the keyboards near a keypad.") == ["keyboard", "keyboard"]  # no pen, no key
    assert _mentions("The dog's leash; a dog leash; puppies.") == ["dog", "leash", "leash", "dog"]
    assert _mentions("MUGS and Padlocks!") == ["cup", "lock"]


def test_repeated_mentions_count_each_time_unless_asked() -> None:
    caption = ["A cup, another cup and a saucer."]
    assert score_chair(caption, [{"cup"}], vocab.SYNONYMS).chair_i == pytest.approx(1 / 3)
    assert score_chair(caption, [{"cup"}], vocab.SYNONYMS, unique_mentions=True).chair_i == pytest.approx(1 / 2)


def test_chair_edge_cases() -> None:
    report = score_chair(["", "A nice picture of nothing much."], [{"cup"}, set()], vocab.SYNONYMS)
    assert (report.chair_s, report.chair_i, report.n_mentions, report.recall) == (0.0, 0.0, 0, 0.0)
    assert not any(item.is_hallucinated for item in report.items)
    empty = score_chair([], [], vocab.SYNONYMS)
    assert (empty.chair_s, empty.chair_i, empty.n_captions) == (0.0, 0.0, 0)
    with pytest.raises(ValueError):
        score_chair(["a cup"], [], vocab.SYNONYMS)


def test_chair_takes_a_coco_style_synonym_table() -> None:
    synonyms = synonyms_from_lines(["person, girl, boy, man", "dining table, table", "hot dog", "dog, puppy", ""])
    report = score_chair(["A man eating hot dogs at the table."], [{"person", "dining table"}], synonyms)
    assert report.items[0].mentioned == ["person", "hot dog", "dining table"]  # "dogs" alone is no dog
    assert report.items[0].hallucinated == ["hot dog"]
    # Ground truth given by synonym is canonicalized too.
    assert score_chair(["two men"], [{"man"}], synonyms).chair_i == 0.0


# A few synonyms.txt lines written as the reference file writes them (two spaces after a comma on
# the motorcycle and cake lines, a capitalised "iPhone").
COCO_LINES = [
    "person, girl, boy, man, woman, baby, adult, passenger, policeman, gentleman, grandchild, people",
    "motorcycle, scooter,  motor bike, motor cycle", "airplane, plane, jet", "bus, minibus, trolley",
    "train, locomotive", "elephant", "bird, duck", "dog, puppy, doggie", "tie, bow, bow tie",
    "chair, seat, stool", "toilet, urinal", "cake,  cheesecake, cupcake", "cell phone, phone, iPhone",
    "tennis racket, racket",
]


def _coco(text: str, mode: str) -> list[str]:
    return RohrbachExtractor(COCO_LINES, mode=mode).caption_words(text).objects  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["rohrbach", "corrected"])
@pytest.mark.parametrize("caption, objects", [
    ("A baby elephant next to an adult bird.", ["elephant", "bird"]),  # not persons
    ("A baby and an adult.", ["person", "person"]),
    ("A passenger jet and a passenger.", ["airplane", "person"]),
    ("A toilet seat.", ["toilet"]),
    ("The seat of the toilet, a stool.", ["toilet", "chair"]),  # every "seat" goes with a toilet
    ("A seat.", ["chair"]),
    ("Train tracks and a train track, then a train.", ["train"]),
    ("Policemen, gentlemen and grandchildren.", ["person", "person", "person"]),
    ("A man in a bow tie.", ["person", "tie"]),
    ("There is no dog.", ["dog"]),  # negation is not detected, as in the paper
])
def test_rohrbach_deliberate_rules_hold_in_both_modes(caption: str, objects: list[str], mode: str) -> None:
    assert _coco(caption, mode) == objects


@pytest.mark.parametrize("caption, rohrbach, corrected", [
    ("A bus next to a minibus.", [], ["bus", "bus"]),  # "bus" -> "bu" in Pattern
    ("Two buses.", ["bus"], ["bus"]),
    ("Two ties.", [], ["tie"]),  # Pattern: "ties" -> "ty"
    ("Doggies.", [], ["dog"]),  # Pattern leaves "doggies" plural
    ("A motor bike and a cheesecake.", [], ["motorcycle", "cake"]),  # leading-space forms
    ("An iPhone.", [], ["cell phone"]),  # capitalised form
    ("A tennis racket.", ["tennis racket"], ["tennis racket"]),
])
def test_corrected_mode_fixes_the_reference_defects(caption: str, rohrbach: list[str], corrected: list[str]) -> None:
    assert _coco(caption, "rohrbach") == rohrbach
    assert _coco(caption, "corrected") == corrected


def test_rohrbach_synonyms_keep_stray_spaces_only_in_rohrbach_mode() -> None:
    assert " motor bike" in rohrbach_synonyms(COCO_LINES) and "motor bike" not in rohrbach_synonyms(COCO_LINES)
    assert rohrbach_synonyms(COCO_LINES, "corrected")["iphone"] == "cell phone"
    assert rohrbach_synonyms(["bow, tie", "tie, bow"])["bow"] == "tie"  # a later line wins
    with pytest.raises(ValueError, match="unknown CHAIR mode"):
        rohrbach_synonyms(COCO_LINES, "strict")  # type: ignore[arg-type]


def test_treebank_tokens_split_final_periods_of_each_sentence_only() -> None:
    assert treebank_tokenize("a dog. a cat's bowl, (hot-dog) don't!") == [
        "a", "dog", ".", "a", "cat", "'s", "bowl", ",", "(", "hot-dog", ")", "do", "n't", "!"]
    assert treebank_tokenize("a dog.cat and 3,5 dogs:") == ["a", "dog.cat", "and", "3,5", "dogs", ":"]


def test_score_chair_takes_a_rohrbach_extractor() -> None:
    extractor = RohrbachExtractor(COCO_LINES)
    report = score_chair(["A baby bird on a seat.", "A bus."], [{"bird"}, {"bus"}], extractor)
    assert [item.mentioned for item in report.items] == [["bird", "chair"], []]
    assert (report.chair_s, report.chair_i) == (0.5, 0.5)


# ------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is no dog in the image.", "no"),
        ("I think yes", "yes"),
        ("There isn't a dog.", "no"),
        ("There is not a dog.", "no"),
        ("Nope", "no"),
        ("yesterday a dog", "no"),  # no yes/no word -> default
        ("", "no"),
        ("Yes. No.", "yes"),  # the first yes/no word decides
    ],
)
def test_parse_yes_no(answer: str, expected: str) -> None:
    assert parse_yes_no(answer) == expected


@pytest.mark.parametrize(
    "answer, official, strict",
    [
        ("There is a dog in the image.", "yes", "no"),  # no decision word: official "yes", strict "no"
        ("Nope.", "yes", "no"),
        ("I don't see any dog.", "yes", "no"),
        ("NO", "yes", "no"),  # only "No", "no", "not" count
        ("No!", "yes", "no"),
        ("No, there is none.", "no", "no"),  # the comma is deleted first
        ("Yes, but not the big one.", "no", "yes"),  # any "not" in the first sentence
        ("Yes. It is not big.", "yes", "yes"),  # only the first sentence counts
        ("The cup yes.", "yes", "yes"),  # the bias world's answers read the same under both
        ("The cup no.", "no", "no"),
    ],
)
def test_official_and_strict_parses(answer: str, official: str, strict: str) -> None:
    assert (parse_answer(answer), parse_answer(answer, "strict")) == (official, strict)


def test_score_pope_parse_is_named() -> None:
    probes = [{"split": "random", "label": "yes"}, {"split": "random", "label": "no"}]
    answers = ["There is a dog.", "Nope."]
    assert score_pope(probes, answers)["random"].yes_ratio == 1.0
    assert score_pope(probes, answers, "strict")["random"].yes_ratio == 0.0
    with pytest.raises(ValueError, match="unknown POPE parse"):
        score_pope(probes, answers, "lenient")  # type: ignore[arg-type]


def test_parse_yes_no_default_is_configurable() -> None:
    assert parse_yes_no("There is a dog.") == "no"
    assert parse_yes_no("There is a dog.", default="yes") == "yes"
    assert parse_yes_no("There is not a dog.", default="yes") == "no"


def test_pope_metrics_hand_computed() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    answers = ["Yes.", "No, there isn't.", "yes", "Yes, I see one.", "No.", "There is not.", "Yes", "Yes"]
    # predictions: yes no yes yes no no yes yes -> TP=3 (0,2,7), FN=1 (1), FP=2 (3,6), TN=2 (4,5)
    scores = pope_metrics(labels, [parse_yes_no(a) for a in answers])
    assert (scores.true_positives, scores.false_negatives, scores.false_positives, scores.true_negatives) == (3, 1, 2, 2)
    assert scores.accuracy == pytest.approx(5 / 8)
    assert scores.precision == pytest.approx(3 / 5)
    assert scores.recall == pytest.approx(3 / 4)
    assert scores.f1 == pytest.approx(2 / 3)  # 2 * 0.6 * 0.75 / 1.35
    assert scores.yes_ratio == pytest.approx(5 / 8)
    empty = pope_metrics([], [])
    assert (empty.accuracy, empty.f1, empty.n) == (0.0, 0.0, 0)


ANNOTATIONS = {"a.png": ["cup", "dog"], "b.png": ["cup", "fork"], "c.png": ["cup", "dog", "pen"], "d.png": []}
VOCABULARY = ["cup", "dog", "fork", "pen", "saucer", "knife"]


def test_pope_probes_negatives_per_split() -> None:
    probes = build_pope_probes(ANNOTATIONS, VOCABULARY, n_per_image=2, seed=0, adversarial_ranking={"cup": ["saucer"]})
    negatives = {(p["split"], p["image"]): [] for p in probes}
    for probe in probes:
        if probe["label"] == "no":
            negatives[(probe["split"], probe["image"])].append(probe["object"])
    # Frequencies: cup 3, dog 2, fork 1, pen 1, knife 0, saucer 0 -> popular order cup dog fork pen knife saucer.
    assert negatives[("popular", "a.png")] == ["fork", "pen"]
    assert negatives[("popular", "c.png")] == ["fork", "knife"]
    # a.png (cup, dog): saucer is cup's ranked partner; then co-occurrence: pen 2 (c), fork 1 (b).
    assert negatives[("adversarial", "a.png")] == ["saucer", "pen"]
    no_ranking = build_pope_probes(ANNOTATIONS, VOCABULARY, n_per_image=2, splits=("adversarial",))
    assert [p["object"] for p in no_ranking if p["image"] == "a.png" and p["label"] == "no"] == ["pen", "fork"]


def test_pope_probes_are_balanced_correct_and_deterministic() -> None:
    probes = build_pope_probes(ANNOTATIONS, VOCABULARY, n_per_image=3, seed=5)
    assert probes == build_pope_probes(ANNOTATIONS, VOCABULARY, n_per_image=3, seed=5)
    assert "d.png" not in {p["image"] for p in probes}
    for split in ("random", "popular", "adversarial"):
        in_split = [p for p in probes if p["split"] == split]
        assert sum(p["label"] == "yes" for p in in_split) == sum(p["label"] == "no" for p in in_split) == 7
    for probe in probes:
        assert (probe["object"] in ANNOTATIONS[probe["image"]]) == (probe["label"] == "yes")
        assert probe["question"] == f"Is there a {probe['object']} in the image?"
    positives = {split: [p["object"] for p in probes if p["split"] == split and p["label"] == "yes"] for split in ("random", "popular")}
    assert positives["random"] == positives["popular"]


def test_score_pope_per_split() -> None:
    probes = build_pope_probes(ANNOTATIONS, VOCABULARY, n_per_image=2)
    perfect = score_pope(probes, ["Yes." if p["label"] == "yes" else "No, there is not." for p in probes])
    assert list(perfect) == ["random", "popular", "adversarial"]
    assert all(s.accuracy == 1.0 and s.f1 == 1.0 and s.yes_ratio == 0.5 for s in perfect.values())
    always_yes = score_pope(probes, ["Yes"] * len(probes))
    assert all(s.precision == 0.5 and s.recall == 1.0 and s.yes_ratio == 1.0 for s in always_yes.values())
