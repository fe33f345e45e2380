"""The shipped label_config.xml is what the backend needs."""

from pathlib import Path

from sam_backend.labelstudio.labelconfig import parse_label_config


def test_shipped_label_config_has_matching_smart_tools():
    config = parse_label_config((Path(__file__).parent.parent / "label_config.xml").read_text())
    assert config.image_key == "image"
    assert config.keypoint_names and config.rectangle_names
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface((Path(__file__).parent.parent / "label_config.xml").read_text())
    for name in config.keypoint_names + config.rectangle_names:
        assert set(interface.get_control(name).labels) == set(config.brush_labels)
