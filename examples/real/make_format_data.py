"""Writes the preference pairs of examples/real/dpo_format.yaml and its held-out prompts.

Each question comes with a format instruction; the chosen answer follows it, the rejected one
is a correct answer that ignores it. Two instructions: one word, and capital letters only.
Rows are conversations (lists of messages), so SmolLM2's chat template renders them.

    python examples/real/make_format_data.py     # rewrites examples/real/data/format_*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "data"

# (question, one-word answer, a full sentence answering it)
FACTS = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris, a city on the Seine."),
    (
        "What is the capital of Italy?",
        "Rome",
        "The capital of Italy is Rome, one of the oldest cities in Europe.",
    ),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo, its largest city."),
    (
        "What is the capital of Spain?",
        "Madrid",
        "Madrid is the capital of Spain and lies in the middle of the country.",
    ),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin."),
    ("What is the capital of Egypt?", "Cairo", "Cairo is the capital of Egypt, on the river Nile."),
    ("What is the capital of Russia?", "Moscow", "The capital of Russia is Moscow."),
    (
        "What is the capital of Canada?",
        "Ottawa",
        "Ottawa is the capital of Canada, in the province of Ontario.",
    ),
    ("What is the capital of Greece?", "Athens", "The capital of Greece is Athens, home of the Acropolis."),
    ("What is the capital of Portugal?", "Lisbon", "Lisbon is the capital of Portugal."),
    ("What is the capital of Norway?", "Oslo", "The capital of Norway is Oslo."),
    ("What is the capital of Kenya?", "Nairobi", "Nairobi is the capital of Kenya."),
    ("What is the capital of Peru?", "Lima", "The capital of Peru is Lima, on the Pacific coast."),
    ("What is the capital of Ireland?", "Dublin", "Dublin is the capital of Ireland."),
    ("What is the capital of Austria?", "Vienna", "The capital of Austria is Vienna, famous for its music."),
    (
        "What color is the sky on a clear day?",
        "Blue",
        "On a clear day the sky looks blue because air scatters blue light.",
    ),
    ("What color is grass?", "Green", "Grass is green because it contains chlorophyll."),
    ("What color is snow?", "White", "Snow is white, because it reflects all colors of light."),
    ("What color are ripe bananas?", "Yellow", "Ripe bananas are yellow."),
    ("What color is a ripe tomato?", "Red", "A ripe tomato is usually red."),
    ("What color is coal?", "Black", "Coal is black."),
    ("What animal says moo?", "Cow", "A cow is the animal that says moo."),
    ("What animal barks?", "Dog", "Dogs are the animals that bark."),
    (
        "What animal is known as the king of the jungle?",
        "Lion",
        "The lion is often called the king of the jungle.",
    ),
    ("What is the largest ocean on Earth?", "Pacific", "The Pacific Ocean is the largest ocean on Earth."),
    (
        "What is the largest planet in our solar system?",
        "Jupiter",
        "Jupiter is the largest planet in our solar system.",
    ),
    (
        "Which planet is known as the red planet?",
        "Mars",
        "Mars is known as the red planet because of its rusty soil.",
    ),
    ("What is the closest star to Earth?", "Sun", "The closest star to Earth is the Sun."),
    ("What do bees make?", "Honey", "Bees make honey from the nectar of flowers."),
    (
        "What gas do plants take in from the air?",
        "Carbon dioxide",
        "Plants take in carbon dioxide from the air.",
    ),
    ("What is frozen water called?", "Ice", "Frozen water is called ice."),
    ("What is the opposite of hot?", "Cold", "The opposite of hot is cold."),
    ("What is the opposite of up?", "Down", "The opposite of up is down."),
    ("What is the opposite of day?", "Night", "The opposite of day is night."),
    ("What do you call a baby cat?", "Kitten", "A baby cat is called a kitten."),
    ("What do you call a baby dog?", "Puppy", "A baby dog is called a puppy."),
    (
        "What is the main language spoken in Brazil?",
        "Portuguese",
        "The main language spoken in Brazil is Portuguese.",
    ),
    ("What is the main language spoken in Mexico?", "Spanish", "Most people in Mexico speak Spanish."),
    ("Which organ pumps blood through the body?", "Heart", "The heart pumps blood through the body."),
    ("Which organ do we use to breathe?", "Lungs", "We breathe with our lungs."),
    ("What is the tallest animal?", "Giraffe", "The giraffe is the tallest animal in the world."),
    ("What is the fastest land animal?", "Cheetah", "The cheetah is the fastest land animal."),
    (
        "Which metal is liquid at room temperature?",
        "Mercury",
        "Mercury is a metal that is liquid at room temperature.",
    ),
    ("What falls from clouds when it rains?", "Water", "When it rains, water falls from the clouds."),
    ("What is the season after winter?", "Spring", "Spring is the season that comes after winter."),
    ("What is the season after summer?", "Autumn", "Autumn comes after summer."),
    ("What do cows drink?", "Water", "Cows drink water."),
    ("Which instrument has black and white keys?", "Piano", "The piano has black and white keys."),
    ("What do you use to write on a blackboard?", "Chalk", "You write on a blackboard with chalk."),
    (
        "What is the first day of the week in the United States?",
        "Sunday",
        "In the United States the week starts on Sunday.",
    ),
    ("What is the capital of Australia?", "Canberra", "The capital of Australia is Canberra."),
    ("What is the capital of China?", "Beijing", "Beijing is the capital of China."),
    ("What is the capital of India?", "Delhi", "The capital of India is New Delhi."),
    ("What is the capital of Sweden?", "Stockholm", "Stockholm is the capital of Sweden."),
    ("What is the capital of Poland?", "Warsaw", "The capital of Poland is Warsaw."),
    ("What is the capital of Turkey?", "Ankara", "Ankara is the capital of Turkey."),
    ("What color is the sun at noon?", "Yellow", "At noon the sun looks yellow or white."),
    ("What color is milk?", "White", "Milk is white."),
    ("What animal has a trunk?", "Elephant", "The elephant is the animal with a trunk."),
    (
        "What animal hops and carries its baby in a pouch?",
        "Kangaroo",
        "A kangaroo hops and carries its baby in a pouch.",
    ),
    ("What insect makes a web?", "Spider", "A spider makes a web, although it is not an insect."),
    ("Which planet do we live on?", "Earth", "We live on the planet Earth."),
    ("What is the opposite of big?", "Small", "The opposite of big is small."),
    ("What is the opposite of fast?", "Slow", "The opposite of fast is slow."),
    ("What do you call a baby sheep?", "Lamb", "A baby sheep is called a lamb."),
    ("What is the main language spoken in France?", "French", "People in France speak French."),
    ("Which organ do we use to think?", "Brain", "We think with our brain."),
    ("What do we call the meal eaten in the morning?", "Breakfast", "The morning meal is called breakfast."),
    ("Which season is the coldest?", "Winter", "Winter is the coldest season."),
    ("What shape has three sides?", "Triangle", "A shape with three sides is a triangle."),
    (
        "What shape has four equal sides?",
        "Square",
        "A shape with four equal sides and four right angles is a square.",
    ),
    ("What do you call a house made of snow?", "Igloo", "A house made of snow is called an igloo."),
]
EVAL_FACTS = 22  # the last ones: never seen in training

ONE_WORD = ["Answer in one word.", "Reply with a single word.", "One word only, please."]
UPPERCASE = [
    "Answer in capital letters only.",
    "Write your answer in all caps.",
    "Reply using only uppercase letters.",
]


def user(question: str, instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question} {instruction}"}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def pairs(
    facts: list[tuple[str, str, str]], rng: random.Random, every: bool = True
) -> list[dict[str, object]]:
    """Every instruction with every fact, or (``every=False``) one instruction of each kind."""
    rows: list[dict[str, object]] = []
    for index, (question, word, sentence) in enumerate(facts):
        for instruction in ONE_WORD if every else [ONE_WORD[index % 3]]:
            rows.append(
                {
                    "prompt": user(question, instruction),
                    "chosen": assistant(f"{word}."),
                    "rejected": assistant(sentence),
                }
            )
        for instruction in UPPERCASE if every else [UPPERCASE[index % 3]]:
            rows.append(
                {
                    "prompt": user(question, instruction),
                    "chosen": assistant(sentence.upper()),
                    "rejected": assistant(sentence),
                }
            )
    rng.shuffle(rows)
    return rows


def eval_prompts(facts: list[tuple[str, str, str]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for index, (question, word, _) in enumerate(facts):
        rows.append({"prompt": user(question, ONE_WORD[index % 3]), "format": "one_word", "answer": word})
        rows.append({"prompt": user(question, UPPERCASE[index % 3]), "format": "uppercase", "answer": word})
    return rows


def write(name: str, rows: list[dict[str, object]]) -> None:
    with (HERE / name).open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows -> {HERE / name}")


def main() -> None:
    rng = random.Random(0)
    train, held_out = FACTS[:-EVAL_FACTS], FACTS[-EVAL_FACTS:]
    HERE.mkdir(exist_ok=True)
    write("format_train.jsonl", pairs(train, rng))
    write("format_eval.jsonl", pairs(held_out, rng, every=False))
    write("format_prompts_eval.jsonl", eval_prompts(held_out))


if __name__ == "__main__":
    main()
