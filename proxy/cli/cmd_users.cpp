// dmzproxy users [--state DIR | --file F] add NAME [-g GROUP]... | passwd NAME | del NAME | list
#include <termios.h>
#include <unistd.h>

#include <iostream>
#include <memory>
#include <random>

#include "commands.hpp"
#include "dmz/proxy/users.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct users_cli {
    std::string state = "lab-state", file, name;
    std::vector<std::string> groups;
    bool password_stdin = false;
};

std::string read_secret(const char* prompt) {
    std::cerr << prompt << std::flush;
    termios old{};
    bool tty = tcgetattr(0, &old) == 0;
    if (tty) {
        termios quiet = old;
        quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
        tcsetattr(0, TCSANOW, &quiet);
    }
    std::string s;
    std::getline(std::cin, s);
    if (tty) {
        tcsetattr(0, TCSANOW, &old);
        std::cerr << "\n";
    }
    return s;
}

/// From stdin (--password-stdin), asked twice on a terminal, or made up and printed.
std::string new_password(bool from_stdin, bool& generated) {
    generated = false;
    if (from_stdin) {
        std::string s;
        std::getline(std::cin, s);
        if (s.empty()) throw std::invalid_argument("empty password on standard input");
        return s;
    }
    if (isatty(0)) {
        auto a = read_secret("New password: ");
        auto b = read_secret("Again: ");
        if (a != b) throw std::invalid_argument("the passwords differ");
        if (a.empty()) throw std::invalid_argument("empty password");
        return a;
    }
    static constexpr char alphabet[] = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    std::random_device rd;
    std::string out;
    for (int i = 0; i < 20; ++i) out.push_back(alphabet[rd() % (sizeof alphabet - 1)]);
    generated = true;
    return out;
}
}  // namespace

command add_users(CLI::App& app) {
    auto o = std::make_shared<users_cli>();
    auto* sub = app.add_subcommand("users", "The listener user store (scrypt hashes): add, passwd, del, list");
    sub->require_subcommand(1);
    sub->add_option("--state", o->state, "lab state folder; the store is STATE/users.toml (default: lab-state)");
    sub->add_option("--file", o->file, "the user store file (overrides --state)");
    auto* add = sub->add_subcommand("add", "Add a user (password from --password-stdin, a prompt, or made up and printed)");
    add->add_option("name", o->name)->required();
    add->add_option("-g,--group", o->groups, "a group the user belongs to (repeatable)");
    add->add_flag("--password-stdin", o->password_stdin, "read the password from standard input");
    auto* passwd = sub->add_subcommand("passwd", "Set a user's password");
    passwd->add_option("name", o->name)->required();
    passwd->add_flag("--password-stdin", o->password_stdin, "read the password from standard input");
    auto* del = sub->add_subcommand("del", "Remove a user");
    del->add_option("name", o->name)->required();
    sub->add_subcommand("list", "List users and their groups");
    return [o, add, passwd, del]() -> int {
        auto file = o->file.empty() ? o->state + "/users.toml" : o->file;
        rules::diagnostics problems;
        auto loaded = proxy::user_store::load(file, problems);
        if (!loaded) {
            print_diagnostics(std::cerr, problems);
            std::cerr << "dmzproxy users: " << file << " is not a user store I can read; nothing changed\n";
            return 1;
        }
        auto& store = *loaded;
        if (add->parsed() || passwd->parsed()) {
            if (add->parsed() && store.find(o->name)) {
                std::cerr << "dmzproxy users add: '" << o->name << "' exists (use passwd)\n";
                return 1;
            }
            if (passwd->parsed() && !store.find(o->name)) {
                std::cerr << "dmzproxy users passwd: no user '" << o->name << "'\n";
                return 1;
            }
            if (o->name.empty() || o->name.find_first_of(":\r\n\t ") != std::string::npos) {
                std::cerr << "dmzproxy users: a user name has no spaces or ':'\n";
                return 2;
            }
            bool generated = false;
            auto pw = new_password(o->password_stdin, generated);
            store.set(o->name, pw, add->parsed() ? std::optional(o->groups) : std::nullopt);
            store.save(file);
            std::cout << (add->parsed() ? "added " : "password set for ") << o->name << " in " << file << "\n";
            if (generated) std::cout << "password: " << pw << "\n";
            return 0;
        }
        if (del->parsed()) {
            if (!store.remove(o->name)) {
                std::cerr << "dmzproxy users del: no user '" << o->name << "'\n";
                return 1;
            }
            store.save(file);
            std::cout << "removed " << o->name << "\n";
            return 0;
        }
        for (auto& [name, u] : store.users()) {
            std::cout << name;
            for (std::size_t i = 0; i < u.groups.size(); ++i) std::cout << (i ? ", " : "  groups: ") << u.groups[i];
            std::cout << "\n";
        }
        return 0;
    };
}

}  // namespace dmz::cli
