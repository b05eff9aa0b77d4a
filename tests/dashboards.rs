//! The Grafana dashboard and the alert rules shipped with the Helm chart
//! query only metrics that pollgate exports (a renamed metric would leave a
//! panel silently empty).

mod support;

use support::*;

/// Every `pollgate_…` name in `text`, histogram series reduced to their
/// family (`_bucket`, `_sum`, `_count`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pollgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        if !names.iter().any(|n| n == family) {
            names.push(family.to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_chart_dashboard_and_alerts_query_only_exported_metrics() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/pollgate");
    let dashboard = std::fs::read_to_string(format!("{chart}/dashboards/pollgate.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{chart}/templates/prometheusrule.yaml")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let wanted: Vec<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    assert!(
        wanted.len() >= 10,
        "the dashboard covers the metrics: {wanted:?}"
    );

    // Upstream metrics exist once an upstream was asked: one proxied GET.
    let backend = support::backend::Backend::start().await;
    let pg = Pollgate::start(&format!(
        "upstreams:\n  app:\n    addrs: [\"{}\"]\n{ROUTES}  - path: \"/\"\n    upstream: app\n",
        backend.addr()
    ));
    assert_eq!(
        client()
            .get(pg.url("/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let exported = get_text(&pg.admin("/metrics")).await;
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &wanted {
        assert!(
            families.contains(&name.as_str()),
            "{name} is queried by the chart but not exported"
        );
    }
}
