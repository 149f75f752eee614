#pragma once
// Networks, listeners, users and groups the evaluation and compile tests' policies share.
#include <string>

namespace dmz::test {

inline const std::string policy_preamble = R"([networks.Internal]
ranges = ["10.0.0.0/8"]

[networks.Perimeter]
ranges = ["127.20.0.0/16"]

[address_sets.relayhost]
ranges = ["10.1.2.3/32"]

[listeners.web]
protocol = "http"
bind = ["127.0.0.1:8080"]

[listeners.admin]
protocol = "http"
bind = ["127.0.0.1:8081"]

[listeners.smtp]
protocol = "smtp"
bind = ["127.0.0.1:2525"]

[groups.admins]
[groups.staff]

[users.alice]
groups = ["admins"]

[users.bob]
groups = ["staff"]
)";

}  // namespace dmz::test
