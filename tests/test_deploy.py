"""The deployment files are valid for the Ray release we pin, and their import path builds the app."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_serve_configs_validate_against_ray_schema():
    from ray.serve.schema import ServeDeploySchema

    configs = [yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()),
               yaml.safe_load(yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])]
    for cfg in configs:
        schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(cfg)
        app = schema.applications[0]
        assert app.import_path == "llm_selector.serve_app:app_builder"
        assert schema.grpc_options.grpc_servicer_functions == [
            "s2t.v1.selector_pb2_grpc.add_SelectorServiceServicer_to_server"]


def test_app_builder_binds_the_selector_with_session_routing(monkeypatch):
    from ray.serve import Application

    from llm_selector import serve_app

    monkeypatch.setenv("S2T_SELECTOR__NUM_REPLICAS", "2")
    app = serve_app.app_builder({"config": None})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2
    router = deployment._deployment_config.request_router_config
    assert router.request_router_class.endswith("ConsistentHashRouter")
    __import__(serve_app.SERVICER_FUNCTION.rsplit(".", 1)[0])  # the proxy must be able to import the stubs
