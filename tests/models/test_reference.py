"""Model references: one set of types, tagged by every loader, re-exported by loading."""

from __future__ import annotations

from torch import nn

from model_forensics.models import loading, reference, zoo


def test_loading_re_exports_the_reference_types() -> None:
    from model_forensics.models.loading import LoadedModel, ModelRef, model_ref, weights_sha256

    assert (LoadedModel, ModelRef, model_ref, weights_sha256) == (
        reference.LoadedModel,
        reference.ModelRef,
        reference.model_ref,
        reference.weights_sha256,
    )


def test_a_tagged_model_names_its_reference() -> None:
    model = nn.Linear(2, 2)
    ref = reference.ModelRef(name="tiny", source="local", reference="/models/tiny")
    reference.tag_model(model, ref)
    assert reference.model_ref(model) == ref


def test_a_foreign_model_gets_a_module_reference() -> None:
    assert reference.model_ref(nn.Linear(2, 2)) == reference.ModelRef(name="Linear", source="module", reference=None)


def test_zoo_models_are_tagged_by_the_zoo() -> None:
    loaded = loading.load("zoo:induction-2l")
    assert reference.model_ref(loaded.model) == loaded.ref == zoo.load("induction-2l").ref
