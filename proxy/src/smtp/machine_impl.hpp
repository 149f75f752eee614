#pragma once
// The SMTP machine's implementation, shared by machine.cpp (transactions) and
// machine_session.cpp (EHLO, STARTTLS, AUTH, XCLIENT). Not a public header.
#include <cctype>

#include "dmz/proxy/smtp/machine.hpp"
#include "dmz/rules/path.hpp"
#include "words.hpp"

namespace dmz::smtp::detail {

using clock_type = std::chrono::steady_clock;
using rules::fault_class;
using rules::make_fault;

/// How a command ended, for the count of client errors.
enum class outcome : std::uint8_t { ok, client_error, end };

/// What the upstream reply being waited for answers.
enum class awaiting : std::uint8_t {
    none,
    reset_for_helo,            ///< RSET, then the EHLO/HELO answer
    reset_for_rset,            ///< RSET, then 250
    reset_refused_data,        ///< RSET after this tier refused a DATA message
    reset_refused_chunks,      ///< RSET after this tier refused the LAST chunk
    reset_refused_data_verb,   ///< RSET after the upstream refused DATA
    reset_refused_message,     ///< RSET after the upstream refused a BDAT message
    xclient,                   ///< XCLIENT LOGIN
    xclient_ehlo,              ///< EHLO after XCLIENT's new greeting
    mail,                      ///< the transaction's MAIL
    mail_rcpt,                 ///< the RCPT pipelined behind MAIL
    rcpt,
    data_verb,                 ///< DATA (the message waits)
    message,                   ///< the end of the message (DATA's dot or BDAT LAST)
};

enum class auth_stage : std::uint8_t { plain_response, login_user, login_password };

inline std::string reply_text(const reply& r) { return std::to_string(r.code) + " " + r.text(); }

class machine_impl final : public machine {
public:
    machine_impl(session_facts f, callbacks& cb) : f_(std::move(f)), cb_(cb), tls_(f_.tls_active), caps_(f_.upstream) {}

    step start() override {
        say("220 " + f_.name + " ESMTP dmzproxy");
        return finish(outcome::ok);
    }

    step on_command(const command& cmd) override;

    step on_syntax_error(std::string_view line, const std::string& reply) override {
        if (names_bdat(line)) return end_in_doubt("501 5.5.4 Syntax: BDAT <size> [LAST]; closing");
        return refuse(reply);
    }

    step on_bad_line(line_result r, std::string_view pending) override {
        // Framing in doubt: say so and stop, rather than guess where a command ends.
        if (r == line_result::bare_lf) return end_in_doubt("500 5.5.2 bare LF in a command; closing");
        if (r == line_result::bare_cr) return end_in_doubt("500 5.5.2 bare CR in a command; closing");
        // Octets follow a BDAT line, and how many is unknown: stop.
        if (names_bdat(pending)) return end_in_doubt("500 5.5.2 Line too long in a BDAT command; closing");
        say("500 5.5.2 Line too long (the limit is 512 octets)");
        state_ = state::skipping_line;
        return next_io(action::skip_line);
    }

    step on_line_skipped() override {
        // An over-long line counts towards the limit, but not as a bad command in the log.
        if (++errors_ >= max_client_errors) return too_many_errors();
        return finish(outcome::ok);
    }

    step on_auth_line(std::string_view line) override;

    step on_credentials(const login_result& r) override;

    step on_auth_line_malformed() override {
        say("500 5.5.2 Malformed authentication response; closing");
        return finish(outcome::end);
    }

    step on_tls_started() override {
        // RFC 3207: the client starts over with EHLO.
        tls_ = true;
        ehlo_.clear();
        return finish(outcome::ok);
    }

    std::size_t feed_data(std::string_view in) override { return data_ ? data_->feed(in) : in.size(); }
    bool data_complete() const override { return !data_ || data_->done(); }
    step on_data_end() override;

    void feed_chunk(std::string_view in) override {
        if (chunk_.take) chunks_->feed(in);
    }
    step on_chunk_end() override;

    step on_upstream_reply(const reply& r) override;
    step on_upstream_lost(const std::string& why) override;
    step on_client_closed(bool timed_out) override;

    smtp::state state() const override { return state_; }
    std::string take_replies() override { return std::exchange(out_, std::string()); }
    const std::string& ehlo() const override { return ehlo_; }
    const std::string& user() const override { return user_; }
    int bad_commands() const override { return bad_commands_; }
    bool upstream_ready() const override { return upstream_ready_; }

private:
    // ---- replies and outcomes ------------------------------------------------------------
    void say(const std::string& line) {
        out_ += line;
        out_ += "\r\n";
    }

    step finish(outcome o) {
        if (o == outcome::end) {
            state_ = state::closed;
            return next_io(action::end);
        }
        if (o == outcome::client_error) {
            ++bad_commands_;
            if (++errors_ >= max_client_errors) return too_many_errors();
        }
        state_ = state::command;
        return next_io(action::read_command);
    }
    step refuse(const std::string& reply) {
        say(reply);
        return finish(outcome::client_error);
    }
    step too_many_errors() {
        say("421 4.7.0 " + f_.name + " too many errors, closing");
        close_transaction("", "");
        return finish(outcome::end);
    }

    /// The client's bytes can no longer be framed (or are not worth reading): the last
    /// reply, the open transaction logged as a bad request, and the session ends.
    step end_in_doubt(const std::string& reply, const std::string& detail = "") {
        say(reply);
        tx_.fault = make_fault(fault_class::bad_request, 0, detail.empty() ? tx_.fault.detail : detail);
        close_transaction("", "");
        return finish(outcome::end);
    }

    /// A command line that starts with the BDAT verb (octets follow it).
    static bool names_bdat(std::string_view line) {
        if (line.size() < 4 || rules::to_lower(line.substr(0, 4)) != "bdat") return false;
        return line.size() == 4 || !std::isalnum(static_cast<unsigned char>(line[4]));
    }

    // ---- upstream ------------------------------------------------------------------------
    step send_upstream(awaiting next, std::string head, std::string body = {}, std::string_view tail = {}) {
        awaiting_ = next;
        state_ = state::upstream;
        auto s = next_io(action::upstream);
        s.up.head = std::move(head);
        s.up.message = !body.empty() || !tail.empty() || next == awaiting::message;
        s.up.body = std::move(body);
        s.up.tail = tail;
        return s;
    }
    step upstream_command(awaiting next, const std::string& line) { return send_upstream(next, line + "\r\n"); }

    /// RSET upstream when the upstream has a transaction open, then `next`.
    step reset_upstream(awaiting next) {
        if (!up_mail_open_) return after_reset(next);
        return upstream_command(next, "RSET");
    }
    step after_reset(awaiting done);

    /// Passes an upstream reply on. A 421 from the next tier closes that tier's session,
    /// so this one ends too (RFC 5321 3.8): the client must not sit on a dead session.
    bool relay_reply(const reply& r) {
        out_ += r.wire();
        if (r.code != 421) return true;
        upstream_ready_ = false;
        tx_.fault = make_fault(fault_class::upstream_protocol, r.code, "the upstream closed the session: " + r.text());
        close_transaction(reply_text(r), "");
        return false;
    }

    // ---- commands ------------------------------------------------------------------------
    step helo(const command& cmd);
    step answer_helo();
    std::string capabilities_reply() const;
    step starttls(const command& cmd);
    step auth(const command& cmd);
    step auth_plain(const std::string& response);
    step auth_login_user(const std::string& response);
    step auth_login_password(const std::string& response);
    bool cancelled(const std::string& response) {
        if (response != "*") return false;
        say("501 5.7.0 Authentication cancelled");
        return true;
    }
    std::optional<std::string> decode(const std::string& response) {
        return response == "=" ? std::optional<std::string>("") : cb_.base64_decode(response);
    }
    step verify(const std::string& user, const std::string& password);
    step xclient(const command& cmd);
    step pass_identity();
    step on_xclient_reply(const reply& r);
    step on_xclient_ehlo_reply(const reply& r);
    step mail(const command& cmd);
    step rcpt(const command& cmd);
    step forward_rcpt(const std::string& path);
    step on_mail_reply(const reply& m);
    step sender_refused(reply m);
    step on_rcpt_reply(const reply& r);
    step data(const command& cmd);
    step bdat(const command& cmd);
    step deliver(std::string msg, bool raw);
    step on_data_verb_reply(const reply& r);
    step on_message_reply(const reply& r);

    // ---- the transaction -----------------------------------------------------------------
    void reset_transaction() {
        in_transaction_ = false;
        pending_mail_.clear();
        up_mail_open_ = false;
        chunks_.reset();
        data_.reset();
        tx_ = log_entry{};
        rcpt_count_ = 0;
    }
    void close_transaction(const std::string& upstream_reply, const std::string& queue);

    session_facts f_;
    callbacks& cb_;
    smtp::state state_ = state::command;
    std::string out_;
    std::string ehlo_, user_;
    bool tls_ = false;
    upstream_capabilities caps_;
    bool upstream_ready_ = true;
    std::string identity_refused_;  ///< the next tier's answer to XCLIENT, when it said no
    int bad_commands_ = 0;          ///< refused commands, for the log
    int errors_ = 0;                ///< refused commands and over-long lines, for the limit

    awaiting awaiting_ = awaiting::none;
    std::string helo_verb_, helo_argument_;  ///< an EHLO or HELO waiting for the upstream's RSET
    auth_stage auth_stage_ = auth_stage::plain_response;
    std::string auth_mech_;
    std::optional<std::string> auth_user_;  ///< LOGIN's decoded user name
    std::string checking_user_;             ///< the name whose credentials are being checked

    bool in_transaction_ = false;
    log_entry tx_;
    std::uint64_t rcpt_count_ = 0;
    /// The transaction's MAIL command, not yet sent upstream (it goes with the first RCPT).
    std::string pending_mail_;
    /// MAIL went upstream in this transaction (accepted or not): RSET resets it there.
    bool up_mail_open_ = false;
    std::string rcpt_path_, rcpt_line_;  ///< the RCPT on its way upstream
    reply mail_reply_;                   ///< the answer to a MAIL pipelined with a RCPT
    std::optional<data_reader> data_;
    /// The BDAT chunks of this transaction so far. Once its reader has refused the message,
    /// further chunks are refused until RSET.
    std::optional<data_reader> chunks_;
    struct chunk_in_progress {
        std::uint64_t size = 0;
        bool last = false, take = false;
        std::string refusal;  ///< why the chunk is read only to be dropped
    } chunk_;
    std::string message_;       ///< a message waiting for the upstream's 354
    bool message_raw_ = false;  ///< it came by BDAT (not dot-stuffed)
    std::string refused_reply_; ///< the upstream's refusal of DATA, logged after RSET
};

}  // namespace dmz::smtp::detail
