"""pytest plugin: rng, the one random source of a test, seeded and its seed printed.

The seed is new for every test unless STSMILTER_TEST_SEED is set; it is printed (pytest
shows it with a failure's captured output) and kept in the test's report
(user_properties), so a failure is repeated with STSMILTER_TEST_SEED=<seed>."""

import os
import random

import pytest


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("STSMILTER_TEST_SEED") or random.SystemRandom().randrange(2 ** 32))
    print(f"random seed {seed}: STSMILTER_TEST_SEED={seed} repeats this test's choices")
    request.node.user_properties.append(("random seed", seed))
    return random.Random(seed)
