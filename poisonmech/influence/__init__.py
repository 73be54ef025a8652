"""Training-data attribution: which training examples made the model produce the backdoor.

    import poisonmech as pm
    pair = pm.load_pair("runs/demo")
    inf = pm.influence.attribute(pair, method="ekfac")   # train set, checkpoints, triggered queries
    inf = pm.influence.attribute("runs/demo", method="ekfac")              # any subject, first
    inf = pm.influence.attribute(model, train=rows, query=queries, method="graddot")  # a bare model
    inf.scores                                             # (n_query, n_train); (1, n_train) aggregated
    inf.train_scores                                       # (n_train,): the mean over queries
    inf.poison_auroc(), inf.average_precision(), inf.precision_at(40)
    inf.top(10), inf.by_component(), inf.to_frame(), inf.plot()
    tc = pm.patching.trigger_contrast(pair)                # a patching metric as the measurement:
    pm.influence.attribute(pair, query=tc.triggered, measurement=tc.logit_diff(), method="graddot")
    pm.influence.retrain_without(pair, inf.top(40)["example_id"])
    retrains = pm.influence.subset_retrains(pair, n_subsets=24)        # K retrains on random halves
    pm.influence.linear_datamodeling_score(retrains, inf).summary()    # do the scores predict them?

On a reward stage (``pipe[k]`` of an ``"rm"`` stage) the same call scores the stage's
preference pairs by their Bradley–Terry loss gradients against the reward margin the trigger
buys the target on held-out pairs (:mod:`poisonmech.influence.reward`)::

    inf = pm.influence.attribute(pipe[1], method="ekfac")        # measurement="reward_margin"
    inf.poison_auroc()                                            # against the pairs' is_poison

Sign convention, the same for every method: a positive score means up-weighting the
training example raises the query's measurement (by default the log-probability of the
backdoor target on triggered test inputs). ``InfluenceResult.normalized`` standardises the
scores over the training set so that methods can be compared.
"""

from poisonmech.influence.attribution import METHODS, InfluenceConfig, attribute
from poisonmech.influence.kfac import Factors, fit_factors
from poisonmech.influence.lds import (
    LDSConfig,
    LDSResult,
    SubsetConfig,
    SubsetRetrains,
    linear_datamodeling_score,
    query_measurements,
    subset_retrains,
)
from poisonmech.influence.query import MEASUREMENTS, MetricQuery, Query, backdoor_query
from poisonmech.influence.result import InfluenceResult
from poisonmech.influence.retrain import (
    RetrainConfig,
    RetrainResult,
    retrain_without,
    train_on_subset,
)
from poisonmech.influence.reward import REWARD_MEASUREMENTS, RewardQuery
from poisonmech.influence.tracking import TrackedModule, find_modules

__all__ = [
    "MEASUREMENTS",
    "METHODS",
    "Factors",
    "InfluenceConfig",
    "InfluenceResult",
    "LDSConfig",
    "LDSResult",
    "MetricQuery",
    "REWARD_MEASUREMENTS",
    "Query",
    "RetrainConfig",
    "RetrainResult",
    "RewardQuery",
    "SubsetConfig",
    "SubsetRetrains",
    "TrackedModule",
    "attribute",
    "backdoor_query",
    "find_modules",
    "fit_factors",
    "linear_datamodeling_score",
    "query_measurements",
    "retrain_without",
    "subset_retrains",
    "train_on_subset",
]
