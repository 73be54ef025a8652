import pytest

from tests.helpers import random_contrast


@pytest.fixture
def tokens():
    return random_contrast(batch=3, vocab=50)
