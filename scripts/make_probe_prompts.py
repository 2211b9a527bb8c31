"""Write the built-in retention probe's prompts (ftcli/resources/probe_prompts.jsonl), deterministically.

The probe asks the base model a few hundred everyday requests of many kinds (explanations, arithmetic, code,
rewriting, lists, facts, short writing, advice, translation, reasoning) and measures how far training moved the model
from its own answers (ftcli/probe.py). The prompts are written here from the project's own templates and word
lists: no third-party data. Re-running this script reproduces the file byte for byte (a test checks it).

    python scripts/make_probe_prompts.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "ftcli" / "resources" / "probe_prompts.jsonl"
COUNT = 240
SEED = 16

TEMPLATES: list[tuple[str, str, dict]] = [
    ("explain", "Explain what {x} is in two sentences.",
     {"x": ["photosynthesis", "inflation", "a black hole", "recursion", "the water cycle", "democracy", "gravity",
            "a vaccine", "compound interest", "an algorithm", "plate tectonics", "a neural network", "a leap year",
            "an ecosystem", "a noun", "a prime number"]}),
    ("tips", "Give three tips for {x}.",
     {"x": ["sleeping better", "learning a new language", "saving money", "running a first 5k", "writing clearly",
            "staying focused while studying", "cooking rice", "speaking in public", "keeping house plants alive",
            "packing for a trip", "starting a vegetable garden", "remembering names"]}),
    ("poem", "Write a short poem about {x}.",
     {"x": ["the sea", "autumn leaves", "a city at night", "an old dog", "the first snow", "a lighthouse",
            "morning coffee", "a train journey", "a thunderstorm", "a quiet library"]}),
    ("arithmetic", "What is {a} {op} {b}?",
     {"a": ["7", "12", "25", "48", "103", "256"], "op": ["+", "-", "×"], "b": ["3", "9", "14", "60"]}),
    ("translate", "Translate into {lang}: \"{x}\"",
     {"lang": ["French", "Spanish", "German"],
      "x": ["Good morning.", "Where is the train station?", "I like apples.", "The weather is nice today.",
            "Thank you very much.", "How old are you?"]}),
    ("code", "Write a Python function that {x}.",
     {"x": ["reverses a string", "checks whether a number is prime", "returns the largest item in a list",
            "counts the vowels in a word", "computes the factorial of n", "merges two sorted lists",
            "removes duplicates from a list while keeping the order", "converts Celsius to Fahrenheit",
            "tells whether a word is a palindrome", "sums the digits of an integer"]}),
    ("summarise", "Summarise in one sentence: {x}",
     {"x": ["The library will close early on Friday because the heating is being repaired. Books due that day can "
            "be returned on Monday without a fine.",
            "Our team finished the project two weeks ahead of schedule. The client asked for a small change to the "
            "colours, which we will make next week.",
            "Heavy rain is expected over the weekend. Farmers are advised to harvest ripe crops before Saturday and "
            "to check their drainage ditches.",
            "The bakery on Elm Street now opens at six. It has added rye bread and a vegan muffin to its menu.",
            "Maria trained for a year to climb the mountain. On the day, fog hid the summit, but she reached it and "
            "said the silence at the top was worth every step.",
            "The new bus line connects the university with the old town every ten minutes. Tickets cost the same as "
            "on other lines."]}),
    ("capital", "What is the capital of {x}?",
     {"x": ["France", "Japan", "Canada", "Kenya", "Brazil", "Australia", "Egypt", "Norway", "India", "Mexico",
            "Italy", "Chile", "Spain", "Thailand"]}),
    ("formal", "Rewrite this sentence to sound more formal: \"{x}\"",
     {"x": ["hey, can u send me the file?", "this meeting was kinda pointless", "gonna be late, sorry!",
            "the food was super good", "we need the numbers asap", "thx for the help yesterday",
            "i can't make it to the thing on friday", "that idea is pretty cool"]}),
    ("list", "List five {x}.",
     {"x": ["fruits that are red", "animals that live in the ocean", "countries in South America",
            "programming languages", "musical instruments", "planets of the solar system", "kitchen tools",
            "sports played with a ball", "colours of the rainbow", "things to bring on a picnic"]}),
    ("yesno", "Is {x}? Answer yes or no, then explain briefly.",
     {"x": ["the sun a star", "ice heavier than the same volume of water", "a tomato a fruit",
            "the moon bigger than the earth", "a spider an insect", "sound faster than light",
            "a whale a mammal", "zero an even number"]}),
    ("email", "Write a short email to {who} about {what}.",
     {"who": ["a colleague", "a landlord", "a teacher"],
      "what": ["a delayed report", "a broken heater", "missing a class", "a change of address"]}),
    ("difference", "What is the difference between {x}?",
     {"x": ["weather and climate", "a virus and a bacterium", "speed and velocity", "memory and storage in a "
            "computer", "a lake and a sea", "empathy and sympathy", "a simile and a metaphor", "an atom and a "
            "molecule"]}),
    ("whatif", "What would happen if {x}?",
     {"x": ["the earth stopped spinning", "everyone worked four days a week", "bees disappeared",
            "the internet went down for a day", "it never rained again in a city", "humans could breathe "
            "under water"]}),
    ("sentence", "Write one sentence that uses the word \"{x}\".",
     {"x": ["reluctant", "harbour", "brittle", "generous", "whisper", "orbit", "meticulous", "lantern",
            "threshold", "curious"]}),
    ("sort", "Sort these numbers from smallest to largest: {x}",
     {"x": ["42, 7, 19, 3, 88", "5, 50, 15, 500, 1", "9, 2, 2, 8, 4, 6", "101, 11, 110, 10", "3.5, 3, 3.25, 4",
            "-2, 0, -7, 5, 1"]}),
    ("name", "Suggest three names for {x}.",
     {"x": ["a small coffee shop", "a black cat", "a hiking club", "a mobile app that tracks habits",
            "a sailing boat", "a bakery that sells only bread"]}),
    ("howto", "How do I {x}?",
     {"x": ["boil an egg", "change a flat bicycle tyre", "tie a tie", "make a cup of tea",
            "reset a forgotten password", "plant a tree", "write a good cover letter", "clean a cast iron pan"]}),
    ("riddle", "Answer the riddle: {x}",
     {"x": ["What has keys but cannot open locks?", "What gets wetter the more it dries?",
            "What has hands but cannot clap?", "What can travel around the world while staying in a corner?",
            "The more you take, the more you leave behind. What am I?"]}),
    ("convert", "Convert {x}.",
     {"x": ["5 kilometres to miles", "2 hours to minutes", "100 degrees Fahrenheit to Celsius", "3 litres to "
            "millilitres", "1.5 metres to centimetres", "72 hours to days", "10 pounds to kilograms"]}),
    ("story", "Continue the story in three sentences: {x}",
     {"x": ["The door of the old house was open, and a light was on inside.",
            "On the morning of the race, Sam could not find her shoes.",
            "The robot had never seen snow before.",
            "When the last train left, only one passenger remained on the platform.",
            "The letter had no name on it, only a drawing of a fox."]}),
    ("child", "Explain to a child why {x}.",
     {"x": ["the sky is blue", "we need to sleep", "leaves change colour in autumn", "ice floats on water",
            "we brush our teeth", "the moon changes shape"]}),
    ("plan", "Make a one-day plan for {x}.",
     {"x": ["visiting a new city", "studying for an exam", "cleaning a whole flat", "a rainy day at home",
            "a birthday picnic"]}),
    ("reason", "{x} Explain your answer.",
     {"x": ["A farmer has 17 sheep and all but 9 run away. How many are left?",
            "If it takes 5 machines 5 minutes to make 5 widgets, how long do 100 machines need for 100 widgets?",
            "Tom is older than Ann, and Ann is older than Ben. Who is the youngest?",
            "A shirt costs 20 dollars after a 20% discount. What was the price before?",
            "Which is heavier, a kilogram of feathers or a kilogram of iron?",
            "If today is Tuesday, what day will it be in 10 days?"]}),
    ("opinion", "Give one argument for and one against {x}.",
     {"x": ["school uniforms", "working from home", "electric cars", "homework for young children",
            "banning cars from city centres", "learning to code at school"]}),
]


def build() -> list[dict]:
    """Every prompt of every template, then a seeded round-robin over the templates until COUNT are taken."""
    rng = random.Random(SEED)
    per_template = []
    for kind, template, slots in TEMPLATES:
        names = list(slots)
        prompts = [template.format(**dict(zip(names, values))) for values in
                   itertools.product(*(slots[n] for n in names))]
        rng.shuffle(prompts)
        per_template.append((kind, prompts))
    if sum(len(p) for _, p in per_template) < COUNT:
        raise SystemExit(f"the templates make fewer than {COUNT} prompts")
    out, taken = [], [0] * len(per_template)
    while len(out) < COUNT:
        for t, (kind, prompts) in enumerate(per_template):
            if taken[t] < len(prompts) and len(out) < COUNT:
                out.append({"id": f"probe-{len(out):03d}", "kind": kind, "prompt": prompts[taken[t]]})
                taken[t] += 1
    return out


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} prompts of {len(TEMPLATES)} kinds → {OUT}")


if __name__ == "__main__":
    main()
