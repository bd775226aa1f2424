//! One WAN transfer per site: devices of a site fetch a model's files from each other.
//! For each model a device needs and does not hold, the controller names the devices
//! of its site that hold the same files (the device reads from them first, then the
//! origin), or, while none does, lets only the first few (the site's seeds) download
//! from the origin and tells the others to wait for them.
//!
//! A pure function of the assignments and what devices reported, applied after
//! placement and rollouts on every replan.

use std::collections::{BTreeMap, HashMap, HashSet};

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::v1 as pb;

/// Peers named in one assignment: enough to fall over to another when one goes away.
pub const MAX_PEERS: usize = 3;

/// The files a spec lists, as the key two assignments share a download by.
fn files_key(spec: &pb::ModelSpec) -> Option<String> {
    // Archive members are blobs of the member, not of what the origin serves: a peer
    // cannot stand in for the origin there.
    if spec.files.is_empty()
        || spec
            .files
            .iter()
            .any(|f| f.archive != pb::ArchiveFormat::Unspecified as i32)
    {
        return None;
    }
    let mut digests: Vec<&str> = spec.files.iter().map(|f| f.sha256.as_str()).collect();
    digests.sort_unstable();
    Some(digests.join(","))
}

/// True for the states in which a model's files are on the device's disk.
pub fn on_disk(state: i32) -> bool {
    matches!(
        pb::ModelState::try_from(state),
        Ok(pb::ModelState::Downloaded
            | pb::ModelState::Validating
            | pb::ModelState::Initializing
            | pb::ModelState::Loading
            | pb::ModelState::Ready
            | pb::ModelState::Unloading)
    )
}

/// True when the device reports the model of `a` with its files on disk, at `a`'s
/// revision (an older revision under the same id holds other files).
fn holds(device: &fpb::Device, a: &fpb::Assignment, model_id: &str) -> bool {
    device
        .models
        .iter()
        .any(|m| m.model_id == model_id && m.revision == a.revision && on_disk(m.state))
}

/// Names peers, or says to wait, in the assignments of every connected device with a
/// site. `seeds` devices per site and set of files may download from the origin at
/// once (at least 1). With a site limit (bytes per second), returns each device's
/// share of it: the limit divided among the devices of its site that fetch from the
/// origin now.
pub fn share(
    assignments: &mut BTreeMap<String, Vec<fpb::Assignment>>,
    devices: &BTreeMap<String, fpb::Device>,
    seeds: usize,
    site_limit: Option<u64>,
) -> HashMap<String, u64> {
    let mut shares = HashMap::new();
    let mut sites: BTreeMap<&str, Vec<&fpb::Device>> = BTreeMap::new();
    for d in devices
        .values()
        .filter(|d| d.connected && !d.site.is_empty())
    {
        sites.entry(d.site.as_str()).or_default().push(d);
    }
    for members in sites.values() {
        let mut from_origin: HashSet<&str> = HashSet::new();
        // Per set of files: who holds them (with an address to serve from), and who
        // needs them, in id order.
        let mut holders: HashMap<String, Vec<&str>> = HashMap::new();
        let mut needers: HashMap<String, Vec<&str>> = HashMap::new();
        for d in members {
            for a in assignments.get(&d.id).into_iter().flatten() {
                let Some(spec) = &a.spec else { continue };
                let Some(key) = files_key(spec) else { continue };
                if holds(d, a, &spec.id) {
                    if !d.peer_address.is_empty() {
                        holders
                            .entry(key)
                            .or_default()
                            .push(d.peer_address.as_str());
                    }
                } else {
                    needers.entry(key).or_default().push(d.id.as_str());
                }
            }
        }
        for (key, waiting) in &needers {
            let held_by = holders.get(key).map(Vec::as_slice).unwrap_or_default();
            // Seeds are the first devices that can pass the files on.
            let seeded: HashSet<&str> = waiting
                .iter()
                .copied()
                .filter(|id| devices.get(*id).is_some_and(|d| !d.peer_address.is_empty()))
                .take(seeds.max(1))
                .collect();
            for (n, id) in waiting.iter().enumerate() {
                let Some(items) = assignments.get_mut(*id) else {
                    continue;
                };
                for a in items.iter_mut() {
                    if a.spec.as_ref().and_then(files_key).as_deref() != Some(key.as_str()) {
                        continue;
                    }
                    if held_by.is_empty() {
                        // Nobody can pass the files on yet: the seeds fetch them; the
                        // others wait, unless no device could ever serve them.
                        a.wait_for_peer = !seeded.is_empty() && !seeded.contains(id);
                        if !a.wait_for_peer {
                            from_origin.insert(id);
                        }
                    } else {
                        // Spread the readers over the holders.
                        a.peers = (0..held_by.len().min(MAX_PEERS))
                            .map(|i| held_by[(n + i) % held_by.len()].to_owned())
                            .collect();
                    }
                }
            }
        }
        if let Some(limit) = site_limit {
            let each = limit / (from_origin.len().max(1) as u64);
            for d in members {
                shares.insert(d.id.clone(), each.max(1));
            }
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, site: &str, holds_model: bool) -> fpb::Device {
        fpb::Device {
            id: id.into(),
            site: site.into(),
            connected: true,
            peer_address: format!("{id}:7700"),
            models: if holds_model {
                vec![fpb::ModelReport {
                    model_id: "m".into(),
                    state: pb::ModelState::Ready as i32,
                    ..Default::default()
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    fn assignment() -> fpb::Assignment {
        fpb::Assignment {
            spec: Some(pb::ModelSpec {
                id: "m".into(),
                files: vec![pb::ModelFile {
                    sha256: "ab".repeat(32),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn fleet(
        devices: &[fpb::Device],
    ) -> (
        BTreeMap<String, Vec<fpb::Assignment>>,
        BTreeMap<String, fpb::Device>,
    ) {
        (
            devices
                .iter()
                .map(|d| (d.id.clone(), vec![assignment()]))
                .collect(),
            devices.iter().map(|d| (d.id.clone(), d.clone())).collect(),
        )
    }

    #[test]
    fn one_seed_per_site_fetches_and_the_others_wait() {
        let (mut a, d) = fleet(&[
            device("a1", "north", false),
            device("a2", "north", false),
            device("a3", "north", false),
            device("b1", "south", false),
        ]);
        share(&mut a, &d, 1, None);
        assert!(
            !a["a1"][0].wait_for_peer,
            "the first device of a site seeds it"
        );
        assert!(a["a2"][0].wait_for_peer && a["a3"][0].wait_for_peer);
        assert!(!a["b1"][0].wait_for_peer, "another site has its own seed");
        assert!(a.values().flatten().all(|x| x.peers.is_empty()));
    }

    #[test]
    fn holders_are_named_and_spread_over() {
        let (mut a, d) = fleet(&[
            device("a1", "north", true),
            device("a2", "north", true),
            device("a3", "north", false),
            device("a4", "north", false),
            device("b1", "south", false),
        ]);
        share(&mut a, &d, 1, None);
        assert!(a["a1"][0].peers.is_empty(), "a holder needs no peer");
        assert_eq!(a["a3"][0].peers, vec!["a1:7700", "a2:7700"]);
        assert_eq!(a["a4"][0].peers, vec!["a2:7700", "a1:7700"]);
        assert!(!a["a3"][0].wait_for_peer);
        assert!(a["b1"][0].peers.is_empty(), "peers stay within their site");
    }

    #[test]
    fn a_site_limit_is_divided_among_its_origin_fetchers() {
        let (mut a, d) = fleet(&[
            device("a1", "north", false),
            device("a2", "north", false),
            device("a3", "north", false),
            device("b1", "south", false),
        ]);
        let shares = share(&mut a, &d, 2, Some(12 << 20));
        assert_eq!(shares["a1"], 6 << 20, "two seeds fetch in the north");
        assert_eq!(shares["a3"], 6 << 20);
        assert_eq!(shares["b1"], 12 << 20, "one in the south");
    }

    #[test]
    fn devices_without_a_site_or_an_address_fetch_for_themselves() {
        let mut no_address = device("a1", "north", false);
        no_address.peer_address.clear();
        let (mut a, d) = fleet(&[no_address, device("a2", "", false), device("a3", "", false)]);
        share(&mut a, &d, 1, None);
        assert!(
            a.values()
                .flatten()
                .all(|x| !x.wait_for_peer && x.peers.is_empty())
        );
    }
}
