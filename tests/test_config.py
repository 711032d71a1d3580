import pytest

from mmtag.config import ConfigError, TrainConfig, load_config, recipe_path


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.002\nmodel:\n  text_encoder: none\n")
    cfg = load_config(f, ["optim.epochs=3", "data.max_len=null", "model.freeze_image=2"])
    assert cfg.optim.lr == 0.002 and cfg.optim.epochs == 3
    assert cfg.model.text_encoder == "none" and cfg.data.max_len is None
    assert cfg.model.freeze_image == "2"
    assert load_config(f, ["model.freeze_image=6.4"]).model.freeze_image == "6.4"  # inside stage 6
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown config key\(s\) \['optim.lrr'\]; valid keys under optim: \['name', 'lr'"),
    ("optim.lr=fast", "optim.lr: expected a finite number, got 'fast'"),
    ("loss.name=hinge", r"loss.name must be one of \['asl', 'bce', 'focal'\]"),
    ("data.limit_train=1.5", "data.limit_train: expected int or null"),
    ("data.train_prop=1.2", r"train_prop must be in \(0, 1\)"),
    ("model.freeze_image=some", "model.freeze_image must be"),
    ("model.freeze_image=6.0", "model.freeze_image must be"),
    ("data.val_block=-1", "data.val_block must be >= 0"),
    ("nosection.x=1", "unknown config key"),
    ("cache.enabled=on", r"cache.enabled must be one of \[.auto., .off.\]"),
    ("optim=3", "optim must be a mapping"),
    ("optim.lr", "--set expects key=value"),
    ("model.image_head=max", r"model.image_head must be one of \['attention', 'linear'\]"),
    ("model.image_head=attention", "set model.aux_heads to 'loss' or 'ensemble'"),
    ("model.image_head=attention model.aux_heads=loss model.text_encoder=none",
     "use 'linear' for a single-modality model"),
    ("model.text_head=max", r"model.text_head must be one of \['attention', 'linear'\]"),
    ("model.fusion=attn", r"model.fusion must be one of \['concat', 'gated', 'query'\]"),
    ("model.query_dim=100 model.query_heads=8", "positive multiple of model.query_heads"),
    ("model.query_dropout=1.0", r"model.query_dropout must be in \[0, 1\)"),
    ("model.query_memory_drop=-0.1", r"model.query_memory_drop must be in \[0, 1\)"),
    ("cache.crop=0", r"cache.crop must be in \(0, 1\]"),
    ("model.text_head=attention model.aux_heads=ensemble", "set model.text_encoder=minilm"),
    ("tta_sizes=[384,big]", r"tta_sizes\[1\]: expected int, got 'big'"),
    ("tta_sizes=[16]", r"tta_sizes must be image sizes in px \(32 to 2048\)"),
    ("data.image_size=448 tta_sizes=[448,512]", r"data.image_size \(448\) is always used"),
    ("tta_sizes=[384,384]", "tta_sizes has a size twice"),
    ("model.query_extra_stage=-1", "model.query_extra_stage must be 0"),
    ("cache.crop=0.8 model.query_extra_stage=6", "leave cache.crop at 1"),
    ("model.head_weights=[1,1]", "model.head_weights must be 3 weights"),
    ("model.head_weights=[1,-1,1]", "model.head_weights must be 3 weights"),
    ("model.head_weights=[0,0,0]", "model.head_weights must be 3 weights"),
    ("model.head_weights=[1,1,1,1]", "a fourth weight needs model.pooled_head=true"),
    ("model.pooled_head=true model.fusion=query model.aux_heads=ensemble",
     "model.head_weights must be 4 weights"),
    ("model.pooled_head=true model.head_weights=[1,1,1,1]", "set model.aux_heads=ensemble and "
     "model.fusion=query"),
    ("model.pooled_head=true", "set model.aux_heads=ensemble and model.fusion=query"),
    ("model.pooled_head=true model.aux_heads=ensemble model.fusion=query model.text_encoder=none "
     "model.head_weights=[1,1,1,1]", "with both an image and a caption encoder"),
    ("model.aux_heads=ensemble model.aux_weight=0", "model.aux_weight must be > 0"),
    ("model.attn_temperatures=[1,0]", "model.attn_temperatures must be > 0"),
])
def test_bad_keys_and_values_say_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_builtin_recipes_load():
    for name in ("report", "demo"):
        cfg = load_config(recipe_path(name))
        assert cfg.optim.epochs >= 1
    report = load_config(recipe_path("report"))
    assert (report.optim.lr, report.optim.epochs, report.optim.batch_size) == (5e-4, 15, 32)
    assert report.data.image_size == 256 and report.model.text_encoder == "glove_lstm"
    with pytest.raises(ConfigError, match="built-in recipe"):
        recipe_path("nope")


def test_bare_off_is_read_as_the_word_off():
    assert load_config(None, ["cache.enabled=off"]).cache.enabled == "off"


def test_expected_f1_sets_with_a_loss_that_skews_probabilities_warn():
    assert load_config(None, ["decision=expected_f1", "loss.name=bce"]).warnings() == []
    assert load_config(None, ["decision=threshold", "loss.name=asl"]).warnings() == []
    (w,) = load_config(None, ["decision=expected_f1", "loss.name=asl"]).warnings()
    assert "loss.name=asl skews the probabilities" in w and "use loss.name=bce" in w


def test_expected_f1_sets_with_self_distillation_warn():
    assert load_config(None, ["decision=threshold", "loss.self_distill=0.3"]).warnings() == []
    (w,) = load_config(None, ["decision=expected_f1", "loss.self_distill=0.3"]).warnings()
    assert "loss.self_distill=0.3" in w and "use decision=threshold" in w


@pytest.mark.parametrize("overrides, expected", [
    (["model.query_memory_drop=0.2", "model.fusion=concat"], "model.query_memory_drop acts on label queries only"),
    (["cache.crop=0.8", "cache.enabled=off", "model.freeze_image=6"], "cache.crop crops cached feature maps"),
    (["cache.crop=0.8", "model.freeze_image=none"], "cache.crop crops cached feature maps"),
])
def test_options_that_would_do_nothing_are_warned_about(overrides, expected):
    (w,) = load_config(None, overrides).warnings()
    assert expected in w
    assert load_config(None, ["model.query_memory_drop=0.2", "model.fusion=query", "cache.crop=0.8",
                              "model.freeze_image=6"]).warnings() == []


def test_tta_sizes_from_yaml_and_the_command_line(tmp_path):
    assert load_config(None, []).tta_sizes == []
    cfg = load_config(None, ["data.image_size=448", "tta_sizes=[384,512]"])
    assert cfg.tta_sizes == [384, 512] and cfg.image_sizes == [448, 384, 512]
    assert load_config(None, ["tta_sizes=384"]).tta_sizes == [384]  # one size needs no brackets
    assert load_config(None, ["tta_sizes=[]"]).tta_sizes == []
    f = tmp_path / "c.yaml"
    f.write_text("tta_sizes: [320]\n")
    assert TrainConfig.from_dict(load_config(f).to_dict()).tta_sizes == [320]


def test_head_weights_from_the_command_line_and_their_warning():
    cfg = load_config(None, ["model.aux_heads=ensemble", "model.head_weights=[1,1,0.5]"])
    assert cfg.model.head_weights == [1.0, 1.0, 0.5] and not cfg.warnings()
    assert load_config(recipe_path("cpu")).model.head_weights == [1.0, 1.0, 0.5]
    assert any("head_weights" in w for w in load_config(None, ["model.head_weights=[1,1,0.5]"]).warnings())
