#pragma once
/// @file Loading one instance's config into the immutable model, with located diagnostics.
#include <optional>
#include <string>
#include <vector>

#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/model.hpp"

namespace toml {
inline namespace v3 {
class table;
}
}  // namespace toml

namespace dmz::rules {

/// What a topology hands to the loader of one of its instances' configs.
struct load_options {
    bool in_topology = false;
    std::string instance_name;
    std::string role;
    std::vector<network> networks;          ///< the topology's networks, External excluded
    std::vector<address_set> address_sets;  ///< one per topology instance and host
};

struct load_result {
    std::optional<instance_config> config;  ///< present unless the file could not be parsed
    diagnostics diags;
    bool parsed = false;  ///< false: unreadable file or TOML syntax error (exit 2)
};

load_result load_instance_config(const std::string& path, const load_options& opts = {});
load_result load_instance_config_text(const std::string& text, const std::string& file,
                                      const load_options& opts = {});
/// For a config written inline in a topology file: `file` is the topology's path and
/// `base_dir` resolves relative file names.
load_result load_instance_config_table(const toml::table& t, const std::string& file,
                                       const std::string& base_dir,
                                       const load_options& opts = {});

/// The Exchange services a `kind = "exchange"` rule can publish, in expansion order.
struct exchange_service_defaults {
    const char* key;
    const char* display;
    std::vector<std::string> paths;
    std::vector<std::string> methods;
    std::uint64_t max_body;
    millis read_timeout;
    bool enabled_by_default;
};
const std::vector<exchange_service_defaults>& exchange_services();

}  // namespace dmz::rules
