"""Sites: parsing, printing, validation against a model's shape."""

from dataclasses import dataclass

import pytest

from mechedit.errors import SiteError
from mechedit.sites import HOOKS, Site, layer_sites


@dataclass
class Shape:
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    d_mlp: int = 64


@pytest.mark.parametrize("text,site", [
    ("blocks.3.hook_resid_pre", Site(3, "resid_pre")),
    ("blocks.0.hook_resid_mid", Site(0, "resid_mid")),
    ("blocks.2.hook_resid_post", Site(2, "resid_post")),
    ("blocks.1.hook_attn_out", Site(1, "attn_out")),
    ("blocks.1.hook_mlp_out", Site(1, "mlp_out")),
    ("blocks.3.attn.hook_z[head=2]", Site(3, "z", head=2)),
    ("blocks.3.attn.hook_q", Site(3, "q")),
    ("blocks.3.attn.hook_k[head=1]", Site(3, "k", head=1)),
    ("blocks.3.attn.hook_v", Site(3, "v")),
    ("blocks.0.attn.hook_pattern[head=5]", Site(0, "pattern", head=5)),
    ("blocks.2.mlp.hook_pre[neuron=17]", Site(2, "mlp_pre", neuron=17)),
    ("blocks.2.mlp.hook_post", Site(2, "mlp_post")),
    ("hook_embed", Site(None, "embed")),
])
def test_parse_and_print_round_trip(text, site):
    assert Site.parse(text) == site
    assert str(site) == text
    assert Site.parse(str(site)) == site


def test_every_component_round_trips():
    for comp in HOOKS:
        s = Site(None if comp == "embed" else 1, comp)
        assert Site.parse(str(s)) == s
        assert s.hook_name == str(s)


@pytest.mark.parametrize("text", ["", "blocks.x.hook_mlp_out", "blocks.1.hook_nothing", "mlp_out",
                                  "blocks.1.attn.hook_z[layer=2]", "blocks.1.hook_mlp_out[head=1]"])
def test_malformed_names_are_rejected_clearly(text):
    with pytest.raises(SiteError) as e:
        Site.parse(text)
    assert "blocks.3" in str(e.value) or "no heads" in str(e.value)


@pytest.mark.parametrize("site,msg", [
    (Site(4, "mlp_out"), "layer 4 is out of range"),
    (Site(-1, "mlp_out"), "layer -1 is out of range"),
    (Site(0, "z", head=6), "head 6 is out of range; the model has 6 heads"),
    (Site(0, "v", head=2), "the model has 2 key/value heads"),
    (Site(0, "mlp_post", neuron=64), "neuron 64 is out of range"),
])
def test_validation_against_shape(site, msg):
    with pytest.raises(SiteError, match=msg):
        site.validate(Shape())


def test_valid_sites_pass_and_chain():
    s = Site(3, "k", head=1)
    assert s.validate(Shape()) is s


@pytest.mark.parametrize("kwargs,msg", [
    (dict(layer=1, component="mlp_out", head=0), "has no heads"),
    (dict(layer=1, component="z", neuron=0), "has no neurons"),
    (dict(layer=None, component="mlp_out"), "only site without a layer"),
    (dict(layer=1, component="embed"), "takes no layer"),
    (dict(layer=1, component="bogus"), "unknown site component"),
])
def test_construction_errors(kwargs, msg):
    with pytest.raises(SiteError, match=msg):
        Site(**kwargs)


def test_sites_sort_and_layer_sites():
    assert layer_sites("mlp_out", 3) == [Site(0, "mlp_out"), Site(1, "mlp_out"), Site(2, "mlp_out")]
    assert sorted([Site(2, "mlp_out"), Site(0, "mlp_out")])[0].layer == 0
