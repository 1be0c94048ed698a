"""Generated monitoring files: committed copies are fresh, provisioning and Prometheus configs load."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import build
from monitoring.dashboards import all_dashboards


def test_committed_files_are_what_monitoring_build_generates() -> None:
    stale = build.stale_files()
    assert not stale, (
        "generated monitoring files are stale: "
        + ", ".join(f"monitoring/{path}" for path in stale)
        + "; run `python -m monitoring.build` and commit the result"
    )


def test_check_mode_exits_1_listing_stale_files_and_write_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(build.stale_files(tmp_path)) == len(build.generated_files())
    build.write(tmp_path)
    assert build.stale_files(tmp_path) == []
    prometheus = tmp_path / "prometheus/prometheus.yml"
    prometheus.write_text(prometheus.read_text() + "# edited\n")
    orphan = tmp_path / build.DASHBOARDS_DIR / "old.json"
    orphan.write_text("{}\n")
    assert build.stale_files(tmp_path) == sorted([Path("prometheus/prometheus.yml"), build.DASHBOARDS_DIR / "old.json"])
    build.write(tmp_path)
    assert build.stale_files(tmp_path) == [] and not orphan.exists()
    assert build.main(["--check"]) == 0  # the repository's own files


def test_dashboard_files_are_sorted_indented_json_with_a_trailing_newline() -> None:
    for board in all_dashboards():
        text = (build.ROOT / build.DASHBOARDS_DIR / f"{board['uid']}.json").read_text(encoding="utf-8")
        assert json.loads(text) == board
        assert text == json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_grafana_provisioning_points_at_the_dashboards_and_the_prometheus_uid() -> None:
    provider = yaml.safe_load((build.ROOT / "grafana/provisioning/dashboards/datanet-gateway.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == build.GRAFANA_DASHBOARDS_PATH
    datasources = yaml.safe_load((build.ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["name"], source["uid"], source["type"]) == ("Prometheus", "prometheus", "prometheus")
    assert source["url"].startswith("http")


def test_committed_prometheus_config_uses_the_default_state_dir_relative_to_itself() -> None:
    config = yaml.safe_load((build.ROOT / "prometheus/prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    files = {job["job_name"]: job["file_sd_configs"][0]["files"] for job in config["scrape_configs"]}
    assert files == {
        "gateway": ["../../.gateway/monitoring/targets/gateway.json"],
        "gateway-engine": ["../../.gateway/monitoring/targets/engine-*.json"],
        "ledger": ["../../.gateway/monitoring/targets/ledger-*.json"],
    }
    # Prometheus resolves these against the config file's directory: the repository's .gateway/.
    resolved = (build.ROOT / "prometheus" / files["gateway"][0]).resolve()
    assert resolved == (build.ROOT.parent / ".gateway/monitoring/targets/gateway.json").resolve()


def write_config(tmp_path: Path) -> Path:
    targets = tmp_path / "monitoring" / "targets"
    targets.mkdir(parents=True)
    (targets / "gateway.json").write_text(json.dumps([{"targets": ["127.0.0.1:9101"]}]))
    (targets / "engine-0.json").write_text(json.dumps([{"targets": ["127.0.0.1:9102"], "labels": {"replica": "0"}}]))
    (targets / "ledger-0.json").write_text(json.dumps([{"targets": ["127.0.0.1:9103"]}]))
    path = tmp_path / "prometheus.yml"
    path.write_text(build.render_yaml(build.prometheus_config(str(targets), "1s"), "test config"))
    return path


def test_prometheus_config_for_a_state_dir_loads(tmp_path: Path) -> None:
    config = yaml.safe_load(write_config(tmp_path).read_text())
    assert config["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    assert [job["job_name"] for job in config["scrape_configs"]] == ["gateway", "gateway-engine", "ledger"]
    for job in config["scrape_configs"]:
        assert job["file_sd_configs"][0]["files"][0].startswith(str(tmp_path))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_generated_and_committed_configs(tmp_path: Path) -> None:
    for path in (write_config(tmp_path), build.ROOT / "prometheus/prometheus.yml"):
        result = subprocess.run(["promtool", "check", "config", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["promtool", "check", "config", str(write_config(tmp_path / "again"))],
                            capture_output=True, text=True, timeout=60)
    assert "WARNING" not in result.stdout + result.stderr  # every target file is found
