"""Hinton's Forward-Forward algorithm (arXiv 2212.13345) on the forwardonly interfaces.

Goodness, negative data, label embedding, the network (registered as the model
``"ff-mlp"``) and its readouts; the estimator ``"ff"`` is
:class:`forwardonly.estimators.ForwardForward`::

    from forwardonly import FFNet, ForwardForward
    net = FFNet((1, 28, 28), 10, widths=(2000, 2000, 2000, 2000))
    est = ForwardForward(net, negatives="hard")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad()
        est.step(x, y)          # every layer's local FF gradient, plus the readout's
        opt.step()
    error = (est.predict(x_test).argmax(-1) != y_test).float().mean()
    refit_head(net, x_train, y_train)  # optional: the linear readout refitted on the final layers
"""

from forwardonly.ff.goodness import ff_loss, ff_loss_and_grad, goodness
from forwardonly.ff.labels import embed_labels, extract_labels, label_trials
from forwardonly.ff.negatives import (
    hard_wrong_labels,
    hybrid_images,
    hybrid_masks,
    random_wrong_labels,
)
from forwardonly.ff.network import FFLayer, FFNet, ff_mlp, rms_normalize
from forwardonly.ff.readout import fit_linear_softmax, readout_features, refit_head

__all__ = [
    "FFLayer",
    "FFNet",
    "embed_labels",
    "extract_labels",
    "ff_loss",
    "ff_loss_and_grad",
    "ff_mlp",
    "fit_linear_softmax",
    "goodness",
    "hard_wrong_labels",
    "hybrid_images",
    "hybrid_masks",
    "label_trials",
    "random_wrong_labels",
    "readout_features",
    "refit_head",
    "rms_normalize",
]
