"""Robustness of image classifiers: the CIFAR-10-C corruption suite, the published CIFAR-10-C
files, and FGSM / PGD attacks with the budget in pixel space.

    corrupt(x, "fog", 3, seed=0)                         one corruption, batched, seeded
    names("all", channels=3)                             the registered corruptions that apply
    load_cifar10c(root, "fog", 3)                        the published images and labels
    attack(model, prepare, x, y, AttackSpec("pgd"), seed=0)
    evaluate_robustness(model, prepare, pixels, labels)  the whole suite on any checkpoint
    evaluate_cifar10c(model, prepare, root)              the published files, same columns
"""
from dgrun.robustness.attacks import AttackSpec, adversarial_accuracy, attack
from dgrun.robustness.cifar10c import CIFAR10C_CORRUPTIONS, load_cifar10c
from dgrun.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt, names
from dgrun.robustness.suite import (evaluate_cifar10c, evaluate_robustness, seeded_subset,
                                    unit_pixels)

__all__ = ["AttackSpec", "CIFAR10C_CORRUPTIONS", "CORRUPTIONS", "SEVERITIES",
           "adversarial_accuracy", "attack", "corrupt", "evaluate_cifar10c",
           "evaluate_robustness", "load_cifar10c", "names", "seeded_subset", "unit_pixels"]
