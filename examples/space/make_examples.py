#!/usr/bin/env python
"""Draw the Space's example images (examples/*.png): synthetic pictures made here, no photographs, so they ship
under the repository's licence (Apache-2.0). Run again to regenerate them; the output is deterministic.

    python examples/space/make_examples.py
"""

from pathlib import Path

from PIL import Image, ImageDraw


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def digit(text: str) -> Image.Image:
    """A handwritten-style digit, white on black, as the main job's classifier (digits, 16x16) sees them."""
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    strokes = {
        "3": [[(18, 12), (44, 12), (30, 30), (46, 42), (36, 54), (16, 52)]],
        "7": [[(14, 12), (50, 12), (28, 56)], [(22, 34), (42, 34)]],
    }[text]
    for stroke in strokes:
        draw.line(stroke, fill=(255, 255, 255), width=7, joint="curve")
    return image


def person() -> Image.Image:
    """A stick figure on a plain background, standing in a 48x96 box at (56, 16)."""
    image = Image.new("RGB", (160, 128), (210, 220, 200))
    draw = ImageDraw.Draw(image)
    skin, cloth = (230, 190, 160), (40, 70, 160)
    draw.ellipse([71, 18, 89, 38], fill=skin)  # head
    draw.line([(80, 38), (80, 76)], fill=cloth, width=8)  # torso
    draw.line([(80, 46), (62, 64), (58, 82)], fill=cloth, width=5)  # arms
    draw.line([(80, 46), (98, 62), (104, 78)], fill=cloth, width=5)
    draw.line([(80, 76), (68, 94), (64, 110)], fill=(30, 30, 30), width=6)  # legs
    draw.line([(80, 76), (92, 94), (96, 110)], fill=(30, 30, 30), width=6)
    return image


def face(yaw_offset: int) -> Image.Image:
    """A cartoon face in a 64x64 box at (32, 16), its nose shifted sideways as the head turns."""
    image = Image.new("RGB", (128, 96), (90, 110, 130))
    draw = ImageDraw.Draw(image)
    draw.ellipse([38, 18, 90, 78], fill=(225, 185, 150))
    for eye_x in (52, 74):
        draw.ellipse([eye_x - 4 + yaw_offset // 2, 38, eye_x + 4 + yaw_offset // 2, 44], fill=(40, 30, 30))
    draw.polygon([(64 + yaw_offset, 46), (60 + yaw_offset, 58), (68 + yaw_offset, 58)], fill=(190, 140, 110))
    draw.line([(54 + yaw_offset // 2, 66), (74 + yaw_offset // 2, 66)], fill=(150, 60, 60), width=3)
    return image


def main():
    EXAMPLES_DIR.mkdir(exist_ok=True)
    images = {
        "digit-3.png": digit("3"), "digit-7.png": digit("7"), "person.png": person(),
        "face-frontal.png": face(0), "face-turned.png": face(-10),
    }  # fmt: skip
    for name, image in images.items():
        image.save(EXAMPLES_DIR / name, optimize=True)
        print(EXAMPLES_DIR / name)


if __name__ == "__main__":
    main()
