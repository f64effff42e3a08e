"""The task's labels, in one place: the 18 classes (class = mask * 6 + gender * 3 + age; mask wear 0 /
incorrect 1 / not wear 2, gender male 0 / female 1, age <30 0 / 30-59 1 / >=60 2), the three heads and
their names, the files a person's folder holds, and the arithmetic between classes and heads. Every module
takes the schema from here."""
from enum import IntEnum

MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
DEFAULT_AGE_BINS = (30, 60)
HEADS = {"mask": 3, "gender": 2, "age": 3}
N_CLASSES = 18
HEAD_NAMES = {"mask": ("wear", "incorrect", "not wear"), "gender": ("male", "female"), "age": ("<30", "30-59", ">=60")}


def heads_of(kind) -> dict:
    """{head: classes} of a model kind: one 18-class head (single_head) or the three."""
    return {"class": N_CLASSES} if kind == "single_head" else HEADS


class MaskLabels(IntEnum):
    MASK = 0
    INCORRECT = 1
    NORMAL = 2

    @classmethod
    def from_file_stem(cls, stem: str) -> "MaskLabels":
        return cls(MASK_FILES[stem.lower()])


class GenderLabels(IntEnum):
    MALE = 0
    FEMALE = 1

    @classmethod
    def from_str(cls, value: str) -> "GenderLabels":
        value = value.strip().lower()
        if value not in ("male", "female"):
            raise ValueError(f"gender must be 'male' or 'female', got {value!r}")
        return cls.MALE if value == "male" else cls.FEMALE


class AgeLabels(IntEnum):
    YOUNG = 0
    MIDDLE = 1
    OLD = 2

    @classmethod
    def from_number(cls, age, bins=DEFAULT_AGE_BINS) -> "AgeLabels":
        age = int(age)
        return cls.YOUNG if age < bins[0] else cls.MIDDLE if age < bins[1] else cls.OLD


def encode_multi_class(mask, gender, age):
    """(mask, gender, age) -> class id 0..17; works on ints and on arrays/tensors."""
    return mask * 6 + gender * 3 + age


def decode_multi_class(class_id):
    """class id -> (mask, gender, age); works on ints and on arrays/tensors."""
    return class_id // 6, (class_id // 3) % 2, class_id % 3


def class_name(class_id) -> str:
    """18-class id -> "wear / female / 30-59"."""
    mask, gender, age = decode_multi_class(int(class_id))
    return f"{HEAD_NAMES['mask'][mask]} / {HEAD_NAMES['gender'][gender]} / {HEAD_NAMES['age'][age]}"


def combine_heads(mask, gender, age):
    """18-class probabilities as the product of per-head ones (class = mask*6 + gender*3 + age);
    tensors or numpy arrays, any leading dimensions."""
    product = mask[..., :, None, None] * gender[..., None, :, None] * age[..., None, None, :]
    return product.reshape(*product.shape[:-3], 18)


def head_probs(probs) -> dict:
    """Per-head probabilities (mask 3, gender 2, age 3) as marginals of 18-class probabilities;
    tensors or numpy arrays, any leading dimensions."""
    grid = probs.reshape(*probs.shape[:-1], 3, 2, 3)
    return {"mask": grid.sum((-2, -1)), "gender": grid.sum((-3, -1)), "age": grid.sum((-3, -2))}
