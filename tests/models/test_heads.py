"""Dense θ2 heads: the FiLM-conditioned DenseHead."""

import pytest
import torch

from gigapatch.models.heads import DenseHead


def test_film_head_starts_as_the_plain_head_and_multiplies_by_cond():
    """A FiLM-conditioned DenseHead equals the plain one at its zero start (same convs), and
    afterwards its output depends on ``cond`` multiplicatively (not just as added channels)."""
    torch.manual_seed(0)
    plain = DenseHead(3, 2, width=5, layers=2)
    film = DenseHead(3, 2, width=5, layers=2, cond_chans=4)
    film.load_state_dict(plain.state_dict(), strict=False)
    x, cond = torch.randn(2, 3, 9, 9), torch.randn(2, 4)
    torch.testing.assert_close(film(x, cond), plain(x))
    torch.nn.init.normal_(film.film.weight)
    with torch.no_grad():
        film.film.bias.zero_()
        layer1 = film.body[0](x)
        gb = film.film(cond).view(2, 2, 2, 5, 1, 1)
        h = torch.relu(layer1 * (1 + gb[:, 0, 0]) + gb[:, 0, 1])
        h = torch.relu(film.body[2](h) * (1 + gb[:, 1, 0]) + gb[:, 1, 1])
        torch.testing.assert_close(film(x, cond), film.out(h))
    with pytest.raises(ValueError, match="cond"):
        film(x)
