//! Property tests of every parser that reads outside input: cursors, route
//! and channel templates, channel names, subscribe requests, config files,
//! sizes and `${VAR}` expansion. Thousands of arbitrary inputs each: no panic, every
//! refusal an error value (a 400 or exit 2 for the user), and what is
//! accepted is well-formed. (Request targets, request heads, Redis payloads
//! and secret redaction have theirs beside their code.)

use pollgate::answer::Format;
use pollgate::config::{expand_env, Config};
use pollgate::cursor::Cursor;
use pollgate::message::MessageId;
use pollgate::routes::{Action, Match, RouteTable};
use pollgate::subscription::SubscribeHead;
use pollgate::target::RequestTarget;
use pollgate::template::{channel_problem, ChannelTemplate, Params, PathTemplate};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn cursors_parse_what_was_issued_and_refuse_the_rest(
        text in "\\PC{0,80}",
        ids in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..5),
        epoch in proptest::option::of(any::<u64>()),
    ) {
        for n in 1..4 {
            let _ = Cursor::parse(&text, n);
        }
        let positions = ids.iter().map(|&(ms, seq)| MessageId { ms, seq }).collect();
        let issued = Cursor(positions, epoch);
        let text = issued.to_string();
        prop_assert_eq!(Cursor::parse(&text, ids.len()).unwrap(), issued.clone());
        prop_assert_eq!(Cursor::parse(&format!("W/\"{text}\""), ids.len()).unwrap(), issued);
        prop_assert!(Cursor::parse(&text, ids.len() + 1).is_err());
    }

    #[test]
    fn route_templates_compile_or_explain(path in "\\PC{0,40}|(/(\\{[a-z_]{0,4}\\}?|[a-z{}]{0,4})){0,5}/?") {
        if let Ok(t) = PathTemplate::parse(&path) {
            let params: Vec<&str> = t.params().collect();
            let mut unique = params.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), params.len(), "a name captured twice");
        }
    }

    #[test]
    fn channel_templates_render_only_valid_names(
        template in "\\PC{0,30}|[a-z:]{0,6}\\{room\\}[a-z:]{0,6}",
        value in "\\PC{0,20}",
    ) {
        if let Ok(t) = ChannelTemplate::parse(&template, ["room"]) {
            let mut params = Params::new();
            params.insert("room", &value);
            if let Ok(name) = t.render(&params) {
                prop_assert!(channel_problem(&name).is_none());
            }
        }
    }

    #[test]
    fn channel_names_are_checked_not_trusted(name in "\\PC{0,300}") {
        let ok = channel_problem(&name).is_none();
        let allowed = !name.is_empty()
            && name.len() <= 256
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.:@/-".contains(c));
        prop_assert_eq!(ok, allowed);
    }

    /// A request path reaches routes only through [`RequestTarget`]: matching on
    /// its segments never panics, and captures are whole decoded segments.
    #[test]
    fn paths_match_decoded_segments(raw in "(/[a-zA-Z0-9%._~-]{0,8}){1,5}") {
        let t = PathTemplate::parse("/{a}/{b}").unwrap();
        if let Ok(target) = RequestTarget::parse(&raw) {
            if let Some(params) = t.matches(target.segments()) {
                prop_assert_eq!(params.get("a"), target.segments().next());
            }
        }
    }

    #[test]
    fn config_files_load_or_name_their_problem(text in "\\PC{0,200}", key in "[a-z_]{1,12}", value in "\\PC{0,12}") {
        for yaml in [text.clone(), format!("{key}: {value}\n"), format!("limits:\n  {key}: {value}\n")] {
            match Config::parse("f.yaml", &yaml) {
                Ok(c) => {
                    if let Err(e) = pollgate::cli::check(&c, "f.yaml") {
                        prop_assert!(e.0.iter().all(|line| line.starts_with("f.yaml: ")));
                    }
                }
                Err(e) => prop_assert!(e.0.iter().all(|line| line.starts_with("f.yaml"))),
            }
        }
    }

    #[test]
    fn env_expansion_never_panics(text in "\\PC{0,60}|(x?\\$\\{[A-Z_:-]{0,6}\\}?){1,4}") {
        let _ = expand_env(&text, |k| (k == "A").then(|| "1".to_string()));
    }

    #[test]
    fn sizes_parse_or_are_refused(text in "\\PC{0,16}|[0-9]{1,25} ?[KMG]i?B?") {
        let _ = pollgate::units::size::parse(&text);
    }

    #[test]
    fn subscribe_requests_parse_or_are_refused(
        path in "/(sub|pair)/[a-zA-Z0-9%:._~-]{0,12}",
        query in "(&?(cursor|timeout|format|x)=([0-9]{1,6}(\\.[0-9]{0,3})?|[0-9]e[0-9]{1,3}|-1|NaN|inf|raw|json|[0-9]{1,20}(%3A[0-9]{1,20})?(%2C[0-9]{1,3})?|[a-zA-Z0-9%+:,._~-]{0,14})){0,4}",
        last_event_id in proptest::option::of("\\PC{0,20}|[0-9]{1,20}(:[0-9]{1,20})?(,[0-9]{1,20}(:[0-9]{1,20})?)?"),
        accept in proptest::option::of("text/event-stream|\\PC{0,12}"),
    ) {
        let yaml = r#"
routes:
  - path: /sub/{channel}
    subscribe: {channels: ["{channel}"], timeout: 30s}
  - path: /pair/{id}
    subscribe: {channels: ["a:{id}", "b:{id}"], timeout: 10s, format: raw}
"#;
        let config = Config::parse("f.yaml", yaml).unwrap();
        let table = RouteTable::compile(&config, "f.yaml").unwrap();
        let Ok(target) = RequestTarget::parse(&format!("{path}?{query}")) else { return Ok(()) };
        let Match::Found(route, params) = table.find("GET", &target) else { return Ok(()) };
        let Action::Subscribe(route) = &route.action else { unreachable!() };
        let head = SubscribeHead {
            query: target.query(),
            last_event_id: last_event_id.as_deref(),
            if_none_match: None,
            accept: accept.as_deref(),
        };
        match head.parse(route, &params) {
            Ok(req) => {
                prop_assert_eq!(req.channels.len(), route.channels.len());
                for name in &req.channels {
                    prop_assert_eq!(channel_problem(name), None);
                }
                prop_assert!(req.timeout <= route.timeout, "{:?} past the route's {:?}", req.timeout, route.timeout);
                let sse = accept.as_deref().is_some_and(|a| a.contains("text/event-stream"));
                prop_assert_eq!(req.format == Format::Sse, sse);
                if let Some(c) = &req.cursor {
                    prop_assert_eq!(c.0.len(), route.channels.len());
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty(), "a refusal says why"),
        }
    }
}
