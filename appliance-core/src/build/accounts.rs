//! Users and groups as `useradd`/`groupadd` make them, edited in the image's own
//! `/etc/passwd`, `/etc/group`, `/etc/shadow` and `/etc/gshadow`; ids allocated the way
//! shadow-utils does with Debian's `login.defs` (system ids from 999 down, others from 1000 up).

use anyhow::{Context as _, bail};

use super::edit::TreeEditor;

const SYS_ID_MIN: u32 = 100;
const SYS_ID_MAX: u32 = 999;
const ID_MIN: u32 = 1000;
const ID_MAX: u32 = 59999;

/// A colon-separated account database, kept line by line so untouched lines stay as written.
#[derive(Debug, Clone, Default)]
struct Table {
    lines: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Self {
        Self {
            lines: text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.split(':').map(str::to_owned).collect())
                .collect(),
        }
    }

    fn render(&self) -> String {
        self.lines
            .iter()
            .map(|fields| fields.join(":") + "\n")
            .collect()
    }

    fn find(&self, name: &str) -> Option<&Vec<String>> {
        self.lines
            .iter()
            .find(|f| f.first().is_some_and(|n| n == name))
    }

    fn find_mut(&mut self, name: &str) -> Option<&mut Vec<String>> {
        self.lines
            .iter_mut()
            .find(|f| f.first().is_some_and(|n| n == name))
    }

    fn ids(&self, column: usize) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|f| f.get(column)?.parse().ok())
            .collect()
    }
}

/// The four account files of an image, edited together and written back at once.
#[derive(Debug)]
pub struct Accounts {
    passwd: Table,
    group: Table,
    shadow: Table,
    gshadow: Table,
    /// Days since the epoch, for shadow's "last changed" field.
    today: i64,
}

/// What a new user asks for (the manifest's `user` node).
#[derive(Debug, Clone, Default)]
pub struct NewUser<'a> {
    pub name: &'a str,
    pub system: bool,
    pub uid: Option<u32>,
    pub group: Option<&'a str>,
    pub groups: &'a [String],
    pub home: Option<&'a str>,
    pub shell: Option<&'a str>,
    pub comment: Option<&'a str>,
    /// A crypt(3) hash for the shadow file (the account stays locked without one).
    pub password_hash: Option<&'a str>,
}

/// What `add_user` decided, for creating the home directory.
#[derive(Debug, Clone)]
pub struct AddedUser {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub create_home: bool,
}

impl Accounts {
    pub fn read(editor: &mut TreeEditor) -> anyhow::Result<Self> {
        let mut read = |path: &str| -> anyhow::Result<Table> {
            Ok(Table::parse(&editor.read_text(path)?.unwrap_or_default()))
        };
        Ok(Self {
            passwd: read("/etc/passwd")?,
            group: read("/etc/group")?,
            shadow: read("/etc/shadow")?,
            gshadow: read("/etc/gshadow")?,
            today: editor.mtime.div_euclid(86_400),
        })
    }

    pub fn write(&self, editor: &mut TreeEditor) -> anyhow::Result<()> {
        editor.rewrite("/etc/passwd", self.passwd.render().as_bytes(), 0o644)?;
        editor.rewrite("/etc/group", self.group.render().as_bytes(), 0o644)?;
        // Debian: shadow files are root:shadow 0640; `rewrite` keeps what the image has.
        editor.rewrite("/etc/shadow", self.shadow.render().as_bytes(), 0o640)?;
        editor.rewrite("/etc/gshadow", self.gshadow.render().as_bytes(), 0o640)?;
        Ok(())
    }

    pub fn uid(&self, name: &str) -> Option<u32> {
        if let Ok(id) = name.parse() {
            return Some(id);
        }
        self.passwd.find(name)?.get(2)?.parse().ok()
    }

    pub fn gid(&self, name: &str) -> Option<u32> {
        if let Ok(id) = name.parse() {
            return Some(id);
        }
        self.group.find(name)?.get(2)?.parse().ok()
    }

    pub fn user_names(&self) -> Vec<String> {
        self.passwd
            .lines
            .iter()
            .filter_map(|f| f.first().cloned())
            .collect()
    }

    pub fn group_names(&self) -> Vec<String> {
        self.group
            .lines
            .iter()
            .filter_map(|f| f.first().cloned())
            .collect()
    }

    fn allocate(used: &[u32], system: bool) -> anyhow::Result<u32> {
        let free = |id: &u32| !used.contains(id);
        let found = if system {
            (SYS_ID_MIN..=SYS_ID_MAX).rev().find(free)
        } else {
            // Above the highest id in use, as useradd does; then any gap.
            let highest = used
                .iter()
                .copied()
                .filter(|id| (ID_MIN..=ID_MAX).contains(id))
                .max();
            highest
                .and_then(|h| (h + 1..=ID_MAX).find(free))
                .or_else(|| (ID_MIN..=ID_MAX).find(free))
        };
        found.context("no free id left in the range")
    }

    /// Add a group unless it exists; returns its id.
    pub fn add_group(&mut self, name: &str, gid: Option<u32>, system: bool) -> anyhow::Result<u32> {
        if let Some(existing) = self.gid(name) {
            if let Some(wanted) = gid
                && wanted != existing
            {
                bail!("group `{name}` already exists with gid {existing}, not {wanted}");
            }
            return Ok(existing);
        }
        let used = self.group.ids(2);
        let gid = match gid {
            Some(gid) if used.contains(&gid) => bail!("gid {gid} is already in use"),
            Some(gid) => gid,
            None => Self::allocate(&used, system)?,
        };
        self.group.lines.push(vec![
            name.into(),
            "x".into(),
            gid.to_string(),
            String::new(),
        ]);
        self.gshadow
            .lines
            .push(vec![name.into(), "!".into(), String::new(), String::new()]);
        Ok(gid)
    }

    fn add_member(&mut self, group: &str, user: &str) -> anyhow::Result<()> {
        let (Some(line), gshadow) = (self.group.find_mut(group), &mut self.gshadow) else {
            bail!("group `{group}` does not exist in the image");
        };
        add_to_list(line, 3, user);
        if let Some(line) = gshadow.find_mut(group) {
            add_to_list(line, 3, user);
        }
        Ok(())
    }

    /// Add a user (with its own group unless `group` is given) unless it exists; existing
    /// users only gain the supplementary groups asked for.
    pub fn add_user(&mut self, user: &NewUser<'_>) -> anyhow::Result<AddedUser> {
        let existing = self.passwd.find(user.name).cloned();
        let added = match existing {
            Some(fields) => {
                let field = |i: usize| fields.get(i).cloned().unwrap_or_default();
                let uid: u32 = field(2).parse().context("a passwd line without uid")?;
                if let Some(wanted) = user.uid
                    && wanted != uid
                {
                    bail!(
                        "user `{}` already exists with uid {uid}, not {wanted}",
                        user.name
                    );
                }
                AddedUser {
                    uid,
                    gid: field(3).parse().context("a passwd line without gid")?,
                    home: field(5),
                    create_home: false,
                }
            }
            None => {
                let used = self.passwd.ids(2);
                let uid = match user.uid {
                    Some(uid) if used.contains(&uid) => bail!("uid {uid} is already in use"),
                    Some(uid) => uid,
                    None => Self::allocate(&used, user.system)?,
                };
                let gid = match user.group {
                    Some(group) => self
                        .gid(group)
                        .with_context(|| format!("group `{group}` does not exist in the image"))?,
                    None => {
                        // useradd prefers a group id equal to the user id when it is free.
                        let wanted = (!self.group.ids(2).contains(&uid)).then_some(uid);
                        self.add_group(user.name, wanted, user.system)?
                    }
                };
                let (home, create_home) = match (user.home, user.system) {
                    (Some(home), _) => (home.to_owned(), true),
                    (None, true) => ("/nonexistent".to_owned(), false),
                    (None, false) => (format!("/home/{}", user.name), true),
                };
                let shell = user.shell.unwrap_or(if user.system {
                    "/usr/sbin/nologin"
                } else {
                    "/bin/bash"
                });
                self.passwd.lines.push(vec![
                    user.name.into(),
                    "x".into(),
                    uid.to_string(),
                    gid.to_string(),
                    user.comment.unwrap_or_default().into(),
                    home.clone(),
                    shell.into(),
                ]);
                let (min, max, warn) = if user.system {
                    (String::new(), String::new(), String::new())
                } else {
                    ("0".into(), "99999".into(), "7".into())
                };
                self.shadow.lines.push(vec![
                    user.name.into(),
                    // Locked without a hash: no password login, keys only.
                    user.password_hash.unwrap_or("!").into(),
                    self.today.to_string(),
                    min,
                    max,
                    warn,
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
                AddedUser {
                    uid,
                    gid,
                    home,
                    create_home,
                }
            }
        };
        if let Some(hash) = user.password_hash
            && let Some(line) = self.shadow.find_mut(user.name)
        {
            match line.get_mut(1) {
                Some(field) => *field = hash.to_owned(),
                None => bail!("the shadow line of `{}` is damaged", user.name),
            }
        }
        for group in user.groups {
            self.add_member(group, user.name)?;
        }
        Ok(added)
    }
}

fn add_to_list(fields: &mut Vec<String>, column: usize, member: &str) {
    while fields.len() <= column {
        fields.push(String::new());
    }
    let mut members: Vec<&str> = fields[column]
        .split(',')
        .filter(|m| !m.is_empty())
        .collect();
    if !members.contains(&member) {
        members.push(member);
    }
    fields[column] = members.join(",");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> Accounts {
        Accounts {
            passwd: Table::parse(
                "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nalice:x:1000:1000::/home/alice:/bin/bash\n",
            ),
            group: Table::parse("root:x:0:\nwww-data:x:33:\nalice:x:1000:\n"),
            shadow: Table::parse("root:*:19000:0:99999:7:::\n"),
            gshadow: Table::parse("root:*::\nwww-data:*::\n"),
            today: 20000,
        }
    }

    #[test]
    fn system_users_get_ids_from_the_top_and_their_own_group() {
        let mut accounts = accounts();
        let groups = vec!["www-data".to_owned()];
        let added = accounts
            .add_user(&NewUser {
                name: "api",
                system: true,
                groups: &groups,
                home: Some("/var/lib/api"),
                ..NewUser::default()
            })
            .expect("added");
        assert_eq!((added.uid, added.gid), (999, 999));
        assert!(added.create_home);
        assert_eq!(
            accounts.passwd.render().lines().last(),
            Some("api:x:999:999::/var/lib/api:/usr/sbin/nologin")
        );
        assert_eq!(
            accounts.shadow.render().lines().last(),
            Some("api:!:20000::::::")
        );
        assert!(accounts.group.render().contains("api:x:999:\n"));
        assert!(accounts.group.render().contains("www-data:x:33:api\n"));
        assert!(accounts.gshadow.render().contains("www-data:*::api\n"));
        assert!(accounts.gshadow.render().contains("api:!::\n"));
    }

    #[test]
    fn regular_users_count_up_and_existing_users_are_kept() {
        let mut accounts = accounts();
        let added = accounts
            .add_user(&NewUser {
                name: "bob",
                ..NewUser::default()
            })
            .expect("added");
        assert_eq!(
            (added.uid, added.gid, added.home.as_str()),
            (1001, 1001, "/home/bob")
        );
        let again = accounts
            .add_user(&NewUser {
                name: "www-data",
                system: true,
                ..NewUser::default()
            })
            .expect("kept");
        assert_eq!(again.uid, 33);
        assert!(!again.create_home);
        let clash = accounts.add_user(&NewUser {
            name: "www-data",
            uid: Some(34),
            ..NewUser::default()
        });
        assert!(clash.is_err());
        assert!(accounts.add_group("x", Some(33), false).is_err());
    }
}
