//! Device profiles: a testing and simulation feature. A profile makes the agent report
//! another kind of device (a phone, a Mac, an edge box) so that a heterogeneous fleet
//! of real agents can run on one machine. Only what the agent reports and the memory
//! it budgets change; everything else (the engines, the store, the network) is real.

use bytesize::ByteSize;
use modeld_engine_core::Accelerator;
use serde::Deserialize;

use super::DeviceClass;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// "phone", "tablet", "laptop", "desktop", "server", "edge-box", ...
    pub device_class: Option<String>,
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub hostname: Option<String>,
    /// Physical memory the device reports (and budgets a share of).
    pub memory: Option<ByteSize>,
    /// Memory loaded models may use; the agent enforces it.
    pub memory_budget: Option<ByteSize>,
    /// Accelerators the device reports besides the CPU: "metal", "ane", "cuda", ...
    pub accelerators: Option<Vec<Accelerator>>,
}

impl DeviceProfile {
    /// Checks what serde cannot: a known device class and non-zero sizes.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(class) = &self.device_class {
            class.parse::<DeviceClass>()?;
        }
        if self.memory.is_some_and(|m| m.as_u64() == 0) {
            return Err("memory must be more than 0".into());
        }
        if self.memory_budget.is_some_and(|m| m.as_u64() == 0) {
            return Err("memory_budget must be more than 0".into());
        }
        if let (Some(memory), Some(budget)) = (self.memory, self.memory_budget)
            && budget > memory
        {
            return Err(format!("memory_budget {budget} exceeds memory {memory}"));
        }
        Ok(())
    }
}

impl std::str::FromStr for DeviceClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let all = [
            DeviceClass::Unknown,
            DeviceClass::Phone,
            DeviceClass::Tablet,
            DeviceClass::Laptop,
            DeviceClass::Desktop,
            DeviceClass::Server,
            DeviceClass::EdgeBox,
            DeviceClass::VirtualMachine,
            DeviceClass::Container,
        ];
        all.into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|c| c.as_str()).collect();
                format!(
                    "{s:?} is not a device class; use one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_profile_parses_and_validates() {
        let p: DeviceProfile = from_json(
            r#"{"device_class":"phone","os":"ios","memory":"6 GiB","memory_budget":"1.5 GiB","accelerators":["metal","ane"]}"#,
        );
        p.validate().unwrap();
        assert_eq!(
            p.accelerators.unwrap(),
            vec![Accelerator::Metal, Accelerator::Ane]
        );
    }

    #[test]
    fn bad_profiles_say_what_is_wrong() {
        let p: DeviceProfile = from_json(r#"{"device_class":"toaster"}"#);
        assert!(p.validate().unwrap_err().contains("not a device class"));
        let p: DeviceProfile = from_json(r#"{"memory":"1 GiB","memory_budget":"2 GiB"}"#);
        assert!(p.validate().unwrap_err().contains("exceeds memory"));
        assert!(serde_json::from_str::<DeviceProfile>(r#"{"ram":"1 GiB"}"#).is_err());
    }

    fn from_json(json: &str) -> DeviceProfile {
        serde_json::from_str(json).unwrap()
    }
}
